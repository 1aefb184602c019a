"""A live line per round: each site's state while the round runs (``server.study.SiteEvent``).

Sites are numbered in the order the coordinator first addresses them (#1, #2, …); a site
that fails or does not answer is also printed on its own line with its name (once it has
announced one), node id and reason, so the record stays in the terminal after the live line
moves on.
"""

from __future__ import annotations

import time
from typing import Callable

from medgan_core.site_label import site_label
from server.study import SiteEvent

MARKS = {"working": "…", "done": "✓", "failed": "✗", "no answer": "✗"}
PHASES = {"train": "training", "evaluate": "evaluating"}


class SiteBoard:
    """Keeps each site's state in the current round and phase; ``line()`` says it in one line."""

    def __init__(self, rounds: int, show: Callable[[str], None], note: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rounds, self.show, self.note, self.clock = rounds, show, note, clock
        self.numbers: dict[int, int] = {}
        self.names: dict[int, str] = {}  # node -> the name its replies announced
        self.states: dict[int, tuple[str, float, float | None]] = {}  # node -> (state, started, finished)
        self.current: tuple[int, str] = (0, "")

    def __call__(self, event: SiteEvent) -> None:
        number = self.numbers.setdefault(event.node, len(self.numbers) + 1)
        if event.site:
            self.names[event.node] = event.site
        if (event.server_round, event.phase) != self.current:
            self.current, self.states = (event.server_round, event.phase), {}
        now = self.clock()
        if event.state == "working":
            self.states[event.node] = ("working", now, None)
        else:
            started = self.states.get(event.node, ("", now, None))[1]
            self.states[event.node] = (event.state, started, now)
            if event.state in ("failed", "no answer"):
                name = self.names.get(event.node, "")
                self.note(f"round {event.server_round} {PHASES.get(event.phase, event.phase)}: site #{number} "
                          f"{site_label(event.node, name) if name else f'(node {event.node})'} {event.state}"
                          + (f": {event.detail}" if event.detail else ""))
        self.show(self.line())

    def __rich__(self) -> str:
        """Rich redraws a status several times a second: the elapsed times tick between events."""
        return self.line() if self.current[1] else "starting the simulation…"

    def line(self) -> str:
        server_round, phase = self.current
        now = self.clock()
        parts = []
        for node, (state, started, finished) in sorted(self.states.items(), key=lambda item: self.numbers[item[0]]):
            seconds = (finished if finished is not None else now) - started
            parts.append(f"#{self.numbers[node]} {MARKS.get(state, '?')} {seconds:.0f} s")
        done = sum(1 for state, _, _ in self.states.values() if state != "working")
        return (f"Round {server_round}/{self.rounds} {PHASES.get(phase, phase)}: {done}/{len(self.states)} answered · "
                + " · ".join(parts))

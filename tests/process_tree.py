"""The processes below a process, read from /proc (tests that check what a simulation started)."""

from __future__ import annotations

from pathlib import Path


def descendants(root: int) -> dict[int, str]:
    """pid -> command name of every process below ``root``."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1: text.rindex(")")], text[text.rindex(")") + 2:].split()
        pid = int(stat.parent.name)
        parents[pid], names[pid] = int(rest[1]), name
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = names[pid]
                frontier.append(pid)
    return found

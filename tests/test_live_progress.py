"""Watching a long study: each site's state as replies arrive (``server.study.exchange``),
the live line the demo shows (``medgan.live.SiteBoard``), and ``run.tracking`` checked
before any round."""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pytest
from flwr.app import ConfigRecord, RecordDict

from medgan.live import SiteBoard
from medgan_core.errors import ConfigError
from medgan_core.study_config import StudyConfig
from server.study import SiteEvent, exchange
from server.tracking import NoTracking, open_tracker


@dataclass
class _Meta:
    dst_node_id: int = 0
    reply_to_message_id: str = ""


@dataclass
class _Msg:
    metadata: _Meta
    error: object = None
    content: RecordDict = field(default_factory=RecordDict)

    def has_error(self) -> bool:
        return self.error is not None


@dataclass
class _Error:
    reason: str


@dataclass
class _Grid:
    """Node 1 answers at the first pull, node 2 fails at the second, node 3 never answers."""

    pulls: int = 0
    pushed: list[str] = field(default_factory=list)

    def push_messages(self, messages: Iterable[_Msg]) -> list[str]:
        self.pushed = [f"m{m.metadata.dst_node_id}" for m in messages]
        return self.pushed

    def pull_messages(self, ids: Iterable[str]) -> list[_Msg]:
        self.pulls += 1
        ids = set(ids)
        out = []
        if self.pulls == 1 and "m1" in ids:
            out.append(_Msg(_Meta(reply_to_message_id="m1"), content=RecordDict(
                {"site": ConfigRecord({"name": "hospital-a"})})))
        if self.pulls == 2 and "m2" in ids:  # a failed reply names its site at the head of its reason
            out.append(_Msg(_Meta(reply_to_message_id="m2"), _Error("[hospital-b] privacy budget:\\n  spent")))
        return out


def test_exchange_reports_each_site_as_its_reply_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    import server.study as study

    monkeypatch.setattr(study, "PULL_INTERVAL_S", 0.01)
    events: list[SiteEvent] = []
    grid = _Grid()
    replies = exchange(grid, [_Msg(_Meta(dst_node_id=n)) for n in (1, 2, 3)], timeout=0.3, server_round=4,
                       phase="train", watch=events.append)  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1", "m2"]
    assert [(e.node, e.state) for e in events] == [(1, "working"), (2, "working"), (3, "working"), (1, "done"),
                                                   (2, "failed"), (3, "no answer")]
    assert events[4].detail == "privacy budget:\\n spent"  # one line, whatever the site sent
    assert [e.site for e in events[3:]] == ["hospital-a", "hospital-b", ""]  # as each reply named its site
    assert "no reply within 0.3 s" in events[5].detail and all(e.server_round == 4 for e in events)


def test_the_live_line_says_each_sites_state_and_time() -> None:
    now = [100.0]
    shown, notes = [], []
    board = SiteBoard(8, show=shown.append, note=notes.append, clock=lambda: now[0])
    assert board.__rich__() == "starting the simulation…"
    board(SiteEvent(3, "train", 901, "working"))
    now[0] = 105.0
    assert board.__rich__() == "Round 3/8 training: 0/1 answered · #1 … 5 s"  # ticks between events as rich redraws
    board(SiteEvent(3, "train", 902, "working"))
    now[0] = 112.0
    board(SiteEvent(3, "train", 901, "done"))
    assert shown[-1] == "Round 3/8 training: 1/2 answered · #1 ✓ 12 s · #2 … 7 s"
    now[0] = 130.0
    board(SiteEvent(3, "train", 902, "failed", "privacy budget: spent"))
    assert shown[-1] == "Round 3/8 training: 2/2 answered · #1 ✓ 12 s · #2 ✗ 25 s"
    assert notes == ["round 3 training: site #2 (node 902) failed: privacy budget: spent"]
    board(SiteEvent(3, "train", 902, "failed", "budget spent", "hospital-b"))  # a reply that named its site
    assert notes[-1] == "round 3 training: site #2 hospital-b (node 902) failed: budget spent"
    board(SiteEvent(3, "evaluate", 902, "working"))  # a new phase starts a new line; numbers stay
    assert shown[-1] == "Round 3/8 evaluating: 0/1 answered · #2 … 0 s"


def test_tracking_is_checked_before_any_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="run.tracking = 'mlflow'; choose one of none, tensorboard"):
        StudyConfig().replace(run={"tracking": "mlflow"})
    assert isinstance(open_tracker("none", tmp_path), NoTracking) and not any(tmp_path.iterdir())

    real_import = builtins.__import__

    def no_tensorboard(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"needs the tensorboard package: pip install -e '\.\[tracking\]'"):
        open_tracker("tensorboard", tmp_path)

"""A site's name travels with its replies, as a short label only, and the coordinator uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, MessageType, RecordDict

from client.app import build_client_app
from client.daemon import node_config
from client.payload import evaluate_reply
from client.site import simulated_site, site_from_context
from client_messages import client_request, round_config
from medgan_core.config import SiteConfig
from medgan_core.errors import ConfigError, WeightsError
from medgan_core.site_label import named_reason, reason_site, site_label
from medgan_core.study_config import StudyConfig
from medgan_core.tasks.registry import build_task
from server.privacy_report import SiteRoundPrivacy, site_labels


@pytest.mark.parametrize("name", ["/data/st-mary", "C:\\pacs", "a" * 65, "-x", "Jane Doe, MRN 123", "x\ny", "_x",
                                  'say "hi"', "a\tb"])
def test_a_name_that_is_not_a_short_label_is_refused_at_start(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="site name .* short label"):
        SiteConfig(str(tmp_path), name=name).validate()


def test_what_a_site_announces(tmp_path: Path) -> None:
    for name in ("St Mary's 2", "Hôpital Nord", "Universitätsklinikum_Ost", "site-01.b"):
        assert SiteConfig(str(tmp_path / "pacs-export-2026"), name=name).validate().announced_name == name
    # a deployed site without a name announces none: its data folder's name stays at the site
    deployed = SiteConfig(str(tmp_path / "pacs-export-2026"))
    assert deployed.announced_name == "" and deployed.site_name == "pacs-export-2026"
    assert 'site-name=""' in node_config(deployed)
    assert simulated_site(tmp_path / "site-01-hospital-a", tmp_path / "s").announced_name == "site-01-hospital-a"
    assert simulated_site(tmp_path / "Klinik (alt)", tmp_path / "s").announced_name == ""
    (tmp_path / "data").mkdir()
    node = {"data-path": str(tmp_path / "data"), "site-name": "hospital-b"}
    assert site_from_context(node, {}).announced_name == "hospital-b"
    with pytest.raises(ConfigError, match="site name"):
        site_from_context({**node, "site-name": "/srv/patients"}, {})
    with pytest.raises(WeightsError, match="not a short label"):
        evaluate_reply({"swd": 0.1}, 3, site_name="/srv/patients")


def test_failed_replies_carry_the_name_at_the_head_of_their_reason() -> None:
    reason = named_reason("hospital-b", "privacy budget: reached")
    assert reason == "[hospital-b] privacy budget: reached"
    assert reason_site(reason) == ("hospital-b", "privacy budget: reached")
    assert reason_site("[/etc/passwd] x") == ("", "[/etc/passwd] x")  # not a name: left as it came
    assert named_reason("", "x") == "x" and site_label(12, "") == "node 12"
    assert site_label(12, "hospital-b") == "hospital-b (node 12)"
    rows = [SiteRoundPrivacy(1, 5, {}), SiteRoundPrivacy(2, 5, {}, "hospital-b"), SiteRoundPrivacy(2, 6, {})]
    assert site_labels(rows) == {5: "hospital-b (node 5)", 6: "node 6"}


def test_a_sites_replies_name_it(tiny_sites: list[Path], tiny_study: StudyConfig, tmp_path: Path) -> None:
    task = build_task(tiny_study.task)
    study = tiny_study.replace(privacy={"enabled": False})
    config = round_config(study, "names")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    site = SiteConfig(str(tiny_sites[0]), name="hospital-b", state_dir=str(tmp_path / "state"))
    app = build_client_app([site])
    reply = app(client_request(MessageType.TRAIN, config, task.get_weights()), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert dict(reply.content.config_records["site"]) == {"name": "hospital-b"}
    # a site whose policy refuses the study says so, headed by its name
    strict = build_client_app([SiteConfig(str(tiny_sites[0]), name="hospital-b", state_dir=str(tmp_path / "s"),
                                          require_dp=True)])
    refused = strict(client_request(MessageType.TRAIN, config, task.get_weights()), context)
    assert refused.has_error() and refused.error.reason.startswith("[hospital-b] privacy policy: ")


def test_a_sites_reason_is_printed_as_text_not_as_console_markup() -> None:
    from rich.text import Text

    from medgan.cli import left_out_line

    reason = "site error: [link=http://evil.example]click here[/link] [/] [bold]"
    line = left_out_line({"node": 9, "site": "hospital-c", "reason": reason})
    assert Text.from_markup(line).plain == f"  left out hospital-c (node 9): {reason}"


def test_a_sites_reason_cannot_put_markdown_into_the_reports(tmp_path: Path) -> None:
    """A link, a remote image (fetched when the report is opened) or a '|' that breaks the
    table: a reason is the site's own text, and the reports show it as text."""
    import re

    from server.privacy_report import privacy_report
    from server.report import write_report
    from server.run_folder import RunFolder

    folder = RunFolder(tmp_path / "run").start(StudyConfig())
    reason = "site error: ![x](http://evil.example/p.png) | [click](http://evil.example) <img src=x> `"
    folder.append_metrics({"round": 1, "sites": [], "train": {}, "evaluate": {},
                           "checkpoint": "checkpoints/round-001.safetensors",
                           "excluded": [{"node": 9, "site": "hospital_c", "reason": reason}]})
    write_report(folder, StudyConfig())
    for text in (folder.report.read_text(), privacy_report(folder)):
        assert "](http" not in text.replace("\\](", "") and "<img" not in text.replace("\\<img", "")
        assert "hospital\\_c (node 9)" in text
    row = next(line for line in folder.report.read_text().splitlines() if line.startswith("| 1 |"))
    header = next(line for line in folder.report.read_text().splitlines() if line.startswith("| round |"))
    cells = lambda line: len(re.findall(r"(?<!\\)\|", line))  # noqa: E731
    assert cells(row) == cells(header)  # the reason's '|' did not add a column


def test_the_coordinator_ignores_a_name_that_is_not_a_label() -> None:
    """A buggy or hostile site's 'name' (a path, a number, a long text) names nothing."""
    from flwr.app import ConfigRecord, Error, Message

    from strategies.grouped_fedavg import reply_site_name

    request = client_request(MessageType.TRAIN, {}, {})
    for name, expected in (("hospital-b", "hospital-b"), ("/etc/passwd", ""), (7, ""), ("a" * 65, "")):
        reply = Message(RecordDict({"site": ConfigRecord({"name": name})}), reply_to=request)
        assert reply_site_name(reply) == expected
    failed = Message(Error(code=4030, reason="[../../x] internal error"), reply_to=request)
    assert reply_site_name(failed) == ""
    named = Message(Error(code=4030, reason="[hospital-b] internal error"), reply_to=request)
    assert reply_site_name(named) == "hospital-b"

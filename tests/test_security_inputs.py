"""Careless input and a careless operator: one clear line and a non-zero exit, nothing lost.

Each test reproduces a defect found by trying it (issue 19, points 10, 11, 13, 14, 15).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medgan_core.study_config import StudyConfig, load_study
from medgan_core.credentials import init_certificates, site_key_pair
from medgan_core.data.manifest import read_manifest
from medgan_core.data.simulate import DEFAULT_SITES, SIMULATED_MARK, simulate_study
from medgan_core.errors import ConfigError, DataError, MedGANError
from medgan_core.fileio import read_jsonl
from medgan.cli import app
from server.run_folder import RunFolder

pytestmark = pytest.mark.security
runner = CliRunner()


def _one_line_error(result, code: int = 2) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error:"), result.output
    return result.output


# --- 14: bad input on the command line -------------------------------------------------------
def test_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes("[run]\nrounds = 2\n# Größe\n".encode("latin-1"))
    out = _one_line_error(runner.invoke(app, ["demo", "--config", str(config)]))
    assert "not UTF-8" in out


def test_empty_or_enclosing_out_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "study.toml"
    config.write_text("[run]\nrounds = 1\n")
    for out in ("", ".", ".."):
        result = runner.invoke(app, ["demo", "--config", str(config), "--out", out])
        assert "run.out-dir" in _one_line_error(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.toml"]  # nothing was moved or written


@pytest.mark.parametrize("san", ["", "a" * 70, "bad host", "-x.example.org", "x" * 254])
def test_certs_init_refuses_bad_sans(tmp_path: Path, san: str) -> None:
    out = _one_line_error(runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "c"), "--san", san]))
    assert "--san" in out
    assert not (tmp_path / "c" / "ca.key").exists()


def test_certs_include_loopback_and_long_valid_names(tmp_path: Path) -> None:
    from cryptography import x509

    long_name = ("a" * 60 + ".") * 3 + "org"  # 186 characters: a valid DNS name longer than a CN may be
    paths = init_certificates(tmp_path / "c", [long_name])
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert long_name in dns and "localhost" in dns and "127.0.0.1" in ips


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", ".hidden", "x" * 65])
def test_site_keys_refuses_names_that_are_paths(tmp_path: Path, name: str) -> None:
    out = _one_line_error(runner.invoke(app, ["site", "keys", "--name", name, "--out", str(tmp_path / "keys")]))
    assert "site name" in out
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # no key written anywhere


def test_server_register_refuses_private_keys_and_certificates(tmp_path: Path) -> None:
    certs = init_certificates(tmp_path / "certs", ["localhost"])
    private, public = site_key_pair(tmp_path / "keys", "site-a")
    coordinator = tmp_path / "coordinator.toml"
    coordinator.write_text(f'[coordinator]\ncerts-dir = "{tmp_path / "certs"}"\n')
    for path, expected in ((private, "PRIVATE key"), (certs.ca_key, "PRIVATE key"),
                           (certs.ca_cert, "certificate"), (certs.server_cert, "certificate")):
        out = _one_line_error(runner.invoke(app, ["server", "register", str(path), "--config", str(coordinator)]))
        assert expected in out
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("ssh-rsa not-base64!!\n")
    assert "not an OpenSSH public key" in _one_line_error(
        runner.invoke(app, ["server", "register", str(garbage), "--config", str(coordinator)]))


def test_unexpected_errors_are_one_line_with_exit_1(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import medgan.cli as cli

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.delenv("MEDGAN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "unexpected RuntimeError: boom" in out and "Traceback" not in out


# --- 15: values accepted silently before -------------------------------------------------------
@pytest.mark.parametrize("line", ["target-epsilon = nan", "target-epsilon = inf", "delta = nan",
                                  "max-grad-norm = inf", "central-clipping-norm = -inf"])
def test_non_finite_numbers_are_refused(tmp_path: Path, line: str) -> None:
    config = tmp_path / "study.toml"
    config.write_text(f"[privacy]\n{line}\n")
    with pytest.raises(ConfigError, match=f"privacy.{line.split()[0]}.*finite"):
        load_study(config)


def test_non_finite_numbers_in_every_table(tmp_path: Path) -> None:
    for table, key in (("run", "round-timeout"), ("task", "lr-generator"), ("aggregation", "server-lr")):
        config = tmp_path / f"{table}.toml"
        config.write_text(f"[{table}]\n{key} = nan\n")
        with pytest.raises(ConfigError, match=f"{table}.{key}"):
            load_study(config)


@pytest.mark.parametrize("delta", [0.1, 0.5, 0.9])
def test_delta_that_is_no_protection_is_refused(delta: float) -> None:
    with pytest.raises(ConfigError, match="privacy.delta"):
        StudyConfig().replace(privacy={"delta": delta})
    assert StudyConfig().replace(privacy={"delta": 1e-3}).privacy.delta == 1e-3


def _manifest(tmp_path: Path, rows: list[str], bom: bool = False) -> Path:
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png", "c.png"):
        (site / "img" / name).write_bytes(b"")
    text = "file,subject,modality,split\n" + "\n".join(rows) + "\n"
    (site / "manifest.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return site


def test_manifest_with_excel_byte_order_mark_is_read(tmp_path: Path) -> None:
    site = _manifest(tmp_path, ["img/a.png,p1,CT,train", "img/b.png,p2,CT,test"], bom=True)
    manifest = read_manifest(site)
    assert [e.file for e in manifest.entries] == ["img/a.png", "img/b.png"]


@pytest.mark.parametrize(("rows", "message"), [
    (["img/a.png,p1,CT,train", "img/a.png,p1,CT,train"], "already listed on line 2"),
    (["img/a.png,p1,CT,train", "./img/a.png,p1,CT,train"], "already listed on line 2"),
    (["img/a.png,p1,CT,train", "img/b.png,p1,CT,test"], "subject 'p1' is in split 'test'"),
    (["img/a.png,p1,CT,train", "img/b.png,p1,CT,val"], "one split only"),
    (["/etc/passwd,p1,CT,train"], "leaves the site folder"),
    (["../site/img/a.png,p1,CT,train"], "leaves the site folder"),
    (["img/../../x.png,p1,CT,train"], "leaves the site folder"),
    (["C:\\\\data\\\\a.png,p1,CT,train"], "leaves the site folder"),
])
def test_manifest_rows_that_would_mislead_are_refused(tmp_path: Path, rows: list[str], message: str) -> None:
    with pytest.raises(DataError, match=message):
        read_manifest(_manifest(tmp_path, rows))


# --- 10: the demo never deletes user data ----------------------------------------------------------
def test_demo_with_another_site_count_deletes_nothing(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    simulate_study(sites, n_sites=2, n_subjects=3, n_slices=1, size=32)
    mine = sites / "site-03-mine"
    mine.mkdir()
    (mine / "manifest.csv").write_text("file,subject,modality,split\n")
    notes = sites / "notes.txt"
    notes.write_text("keep me")
    before = sorted(str(p.relative_to(sites)) for p in sites.rglob("*"))
    config = tmp_path / "study.toml"
    config.write_text(f'[run]\nnum-sites = 3\nsites-dir = "{sites}"\nout-dir = "{tmp_path / "run"}"\n')
    out = _one_line_error(runner.invoke(app, ["demo", "--config", str(config)]))
    assert "holds 2 site(s) but run.num-sites = 3" in out
    assert sorted(str(p.relative_to(sites)) for p in sites.rglob("*")) == before


def test_simulate_force_replaces_only_simulated_folders(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    folders = simulate_study(sites, n_sites=2, n_subjects=3, n_slices=1, size=32)
    assert all((f / SIMULATED_MARK).is_file() for f in folders)
    (folders[0] / SIMULATED_MARK).unlink()  # a folder the user took over: no longer the simulator's
    (folders[0] / "my-notes.txt").write_text("mine")
    (sites / "README.txt").write_text("mine too")
    args = ["sites", "simulate", "--sites", "1", "--out", str(sites), "--subjects", "3", "--slices", "1",
            "--size", "32", "--force"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "kept" in result.output
    assert (folders[0] / "my-notes.txt").read_text() == "mine"
    assert (sites / "README.txt").read_text() == "mine too"
    assert json.loads((sites / "study.json").read_text())["sites"] == [folders[0].name]
    assert not folders[1].exists()  # the simulator's own second site was replaced by the 1-site study


# --- 11: one run per folder -------------------------------------------------------------------------
def test_second_run_on_a_locked_folder_is_refused(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        folder.start(StudyConfig())
        (folder.root / "marker").write_text("first run")
        with pytest.raises(MedGANError, match="in use by another run"):
            RunFolder(tmp_path / "run").check_free()
        config = tmp_path / "study.toml"
        config.write_text(f'[run]\nout-dir = "{tmp_path / "run"}"\nsites-dir = "{tmp_path / "none"}"\n')
        (tmp_path / "none").mkdir()
        (tmp_path / "none" / "study.json").write_text('{"sites": ["a", "b", "c"], "format": 2}')
        out = _one_line_error(runner.invoke(app, ["demo", "--config", str(config)]))
        assert "in use by another run" in out
        assert (folder.root / "marker").read_text() == "first run"  # not archived mid-run
    folder.check_free()  # released when the run ends


def test_lock_is_released_when_the_holder_dies(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys, os; from pathlib import Path; from server.run_folder import RunFolder\n"
            f"cm = RunFolder(Path({str(tmp_path / 'run')!r})).lock(); cm.__enter__(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    RunFolder(tmp_path / "run").check_free()  # a killed run leaves no stale lock


# --- 13: a power loss mid-write ------------------------------------------------------------------
def test_resume_repairs_a_torn_metrics_line_and_orphaned_temp_files(tmp_path: Path) -> None:
    from medgan_core.checkpoints import save_checkpoint

    import numpy as np

    folder = RunFolder(tmp_path / "run").start(StudyConfig())
    save_checkpoint(folder.checkpoint(0), {"generator.w": np.zeros(2, np.float32)}, {"round": 0})
    folder.append_metrics({"round": 0})
    with folder.metrics.open("a") as handle:
        handle.write('{"round": 1, "train": {"loss')  # power loss mid-line
    orphan = folder.root / "checkpoints" / ".round-001.safetensors.abc123.tmp"
    orphan.write_bytes(b"\0" * 1024)
    last, _ = folder.resume_point()
    assert last == 0
    assert not orphan.exists()
    folder.append_metrics({"round": 1, "train": {"loss-d": 1.0}})
    assert [r["round"] for r in read_jsonl(folder.metrics)] == [0, 1]  # the resumed round's line survives
    assert folder.metrics.read_text().endswith("\n")
    assert math.isfinite(read_jsonl(folder.metrics)[1]["train"]["loss-d"])


def test_default_sites_still_simulate_valid_manifests(tmp_path: Path) -> None:
    """The stricter manifest checks accept what the simulator writes (one split per subject)."""
    from medgan_core.data.simulate import simulate_site

    site = simulate_site(DEFAULT_SITES[1], tmp_path / "b", n_subjects=5, n_slices=1, size=32, seed=3)
    assert len(read_manifest(site).entries) > 5

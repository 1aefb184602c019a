"""A study on a Ray cluster that was already running (issue 25, point 4).

A head started with ``ray start`` (on loopback here: this machine is the whole cluster) takes
a small study's sites; the study's driver starts no Ray of its own. A wrong address is one
line within seconds, and a site in a cluster open to the network without token and TLS
still refuses to train.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from medgan_core.errors import ConfigError
from medgan_core.fileio import read_jsonl
from tests.process_tree import descendants


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head() -> Iterator[tuple[str, subprocess.Popen]]:
    """``ray start --head --block`` on 127.0.0.1 with 2 CPUs; stopped (with everything it started) after."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                             "--disable-usage-stats", "--temp-dir", temp],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not come up on port {port}")
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", head
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of this head still alive
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_study_runs_on_a_ray_cluster_started_with_ray_start(ray_head, tiny_sites: list[Path], tmp_path: Path,
                                                             tiny_study) -> None:
    from medgan.simulation import simulate_federation

    address, head = ray_head
    seen: dict[str, dict[int, str]] = {}

    def look(summary: object) -> None:
        if getattr(summary, "server_round", 0) == 1:
            seen["head"] = descendants(head.pid)
            seen["driver"] = {pid: name for pid, name in descendants(os.getpid()).items()
                              if pid != head.pid and pid not in seen["head"]}  # the fixture started the head

    run = simulate_federation(tiny_study.replace(run={"rounds": 1}), tiny_sites, tmp_path / "run", progress=look,
                              ray_address=address)
    rounds = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("round") == 1]
    assert rounds and len(rounds[-1]["sites"]) == len(tiny_sites) and not rounds[-1]["excluded"], rounds
    assert (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
    # The sites trained in the head's workers; the driver started no GCS or raylet of its own.
    assert not {"gcs_server", "raylet"} & set(seen["driver"].values()), seen["driver"]
    assert {"gcs_server", "raylet"} <= set(seen["head"].values()), seen["head"]
    assert any(name.startswith("ray::ClientApp") for name in seen["head"].values()), seen["head"]
    assert head.poll() is None  # the cluster outlives the study


def test_no_ray_head_at_the_address_is_one_line_within_seconds(tiny_sites: list[Path], tmp_path: Path,
                                                               tiny_study) -> None:
    from medgan.simulation import simulate_federation

    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"no Ray head answers at 127\.0\.0\.1:\d+"):
        simulate_federation(tiny_study, tiny_sites, tmp_path / "run", ray_address=f"127.0.0.1:{_free_port()}")
    assert time.monotonic() - started < 15  # Ray's own retries would wait minutes
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        simulate_federation(tiny_study, tiny_sites, tmp_path / "run", ray_address="head-without-port")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(("token", "tls", "refused"), [(False, False, True), (True, False, True),
                                                      (False, True, True), (True, True, False)])
def test_a_cluster_open_to_the_network_needs_token_and_tls(monkeypatch: pytest.MonkeyPatch, token: bool, tls: bool,
                                                           refused: bool) -> None:
    """A site on a non-loopback Ray node trains only if Ray asks every caller for a token over TLS."""
    import ray

    from client import ray_guard

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.1.2.3")
    monkeypatch.setattr(ray_guard, "token_authenticated", lambda: token)
    monkeypatch.setenv("RAY_USE_TLS", "1" if tls else "0")
    refusal = ray_guard.ray_exposure()
    assert bool(refusal) is refused
    if refused:
        assert "listens on 10.1.2.3" in refusal and "RAY_AUTH_MODE=token and RAY_USE_TLS=1" in refusal
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    assert ray_guard.ray_exposure() == ""  # loopback: nothing to ask for


def test_token_authentication_is_read_from_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard asks the installed Ray (its auth mode), not the environment or our own guess."""
    from ray._private.authentication import authentication_utils

    from client.ray_guard import token_authenticated

    assert token_authenticated() is authentication_utils.is_token_auth_enabled()
    for mode in (True, False):
        monkeypatch.setattr(authentication_utils, "is_token_auth_enabled", lambda mode=mode: mode)
        assert token_authenticated() is mode

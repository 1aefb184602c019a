"""The simulation cannot be reached from the network (issue 19, point 2).

Ray, Flower's simulation engine, opens its gRPC servers on every interface unless its
node address is loopback, which on Linux it is only with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. Every simulation path sets that before Ray starts,
and every simulated site refuses to touch its images in a Ray that is not on loopback;
``medgan demo`` also runs in a private network namespace that holds only loopback. These
tests run the real paths and read the sockets Ray's own processes listen on.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medgan import private_network
from medgan_core.fileio import read_jsonl
from tests.process_tree import descendants, listening_addresses

pytestmark = [pytest.mark.slow, pytest.mark.security]


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_the_python_api_keeps_ray_on_loopback(federated_run: dict) -> None:
    """simulate_federation (no namespace): every socket Ray's processes listen on is loopback
    (read mid-study, in round 1 of the shared federation: conftest's ``federated_run``)."""
    seen = federated_run["listening"]
    assert len(seen) >= 4, seen  # the driver's, GCS's, raylet's and the workers' servers, seen mid-study
    assert all(_loopback(address) for address in seen.values()), seen


def test_a_site_in_a_ray_open_to_the_network_refuses(tiny_sites: list[Path], tmp_path: Path, tiny_study,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """As if Ray had been started the way it starts by default: every site refuses, in one line."""
    import ray._private.ray_constants as ray_constants

    import medgan.simulation as simulation
    from server.study import StudyFailed

    monkeypatch.setattr(simulation, "keep_ray_on_loopback", lambda: None)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    with pytest.raises(StudyFailed):
        simulation.simulate_federation(tiny_study.replace(run={"rounds": 1}), tiny_sites, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    reasons = [e["reason"] for r in records for e in r.get("excluded", [])]
    assert reasons and all("this simulated site refuses to train: the simulation's Ray listens on" in r
                           for r in reasons), reasons
    from medgan_core.run_layout import RunLayout

    for site in tiny_sites:  # refused before any step: no privacy was spent, nothing was accounted
        state = RunLayout(tmp_path / "run").site_state(site.name)
        assert not list(state.glob("accountant-*")) and not (state / "ledger-index.json").exists()


def _ray_processes(marker: str) -> set[int]:
    """Ray's own processes (GCS, raylet, workers) whose environment holds ``marker``."""
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            name = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if marker.encode() in environ and (name in ("raylet", "gcs_server") or name.startswith("ray::")):
            found.add(int(proc.name))
    return found


def test_flwr_run_keeps_ray_on_loopback(tiny_sites: list[Path], tmp_path: Path) -> None:
    """`flwr run . local-sim` without the README's export: Flower loads our ClientApp before it
    starts Ray, and loading it keeps that Ray on 127.0.0.1."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local-sim"\n\n[superlink.local-sim]\n'
                                      'address = ":local:"\noptions.num-supernodes = 2\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # as a user's shell would have it
    settings = (f'run.rounds=1 run.num-sites=2 task.local-steps=1 task.image-size=16 task.width=8 task.batch-size=4 '
                f'run.sites-dir="{tiny_sites[0].parent}" run.out-dir="{tmp_path / "run"}" privacy.enabled=false')
    root = Path(__file__).resolve().parents[1]
    run = subprocess.Popen([str(Path(sys.executable).parent / "flwr"), "run", str(root), "local-sim", "--stream",
                            "--run-config", settings], cwd=root, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    seen: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 240
        while run.poll() is None and time.monotonic() < deadline:
            seen.update(listening_addresses(_ray_processes(f"FLWR_HOME={home}")))
            time.sleep(0.3)
        output = run.communicate(timeout=60)[0]
    finally:
        run.kill()
        for proc in Path("/proc").glob("[0-9]*"):  # the local SuperLink flwr run left in the background
            try:
                if f"FLWR_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), 9)
            except OSError:
                continue
    assert run.returncode == 0, output[-3000:]
    assert len(seen) >= 3, (seen, output[-2000:])  # GCS, raylet and workers seen while the run went on
    assert all(_loopback(address) for address in seen.values()), seen


def _interfaces(pid: int) -> set[str]:
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return {line.split(":")[0].strip() for line in lines}


@pytest.mark.skipif(not private_network.available(), reason="this kernel allows no unprivileged network namespace")
def test_demo_runs_ray_where_only_loopback_exists(tiny_sites: list[Path], tmp_path: Path) -> None:
    config = tmp_path / "study.toml"
    config.write_text(
        f'[run]\nrounds = 1\nnum-sites = 2\nsites-dir = "{tiny_sites[0].parent}"\nout-dir = "{tmp_path / "run"}"\n'
        'device = "cpu"\n[task]\nimage-size = 16\nbatch-size = 4\nlocal-steps = 1\nwidth = 8\nz-dim = 8\n'
        'eval-samples = 8\n')
    medgan = Path(sys.executable).parent / "medgan"
    demo = subprocess.Popen([str(medgan), "demo", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "MEDGAN_PRIVATE_NETWORK": ""})
    checked: dict[int, set[str]] = {}
    deadline = time.monotonic() + 240
    while demo.poll() is None and time.monotonic() < deadline:
        for pid, name in descendants(demo.pid).items():
            if name in ("gcs_server", "raylet") and pid not in checked:
                try:
                    checked[pid] = _interfaces(pid)
                    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
                except FileNotFoundError:
                    continue
        time.sleep(0.2)
    output = demo.communicate(timeout=60)[0]
    assert demo.returncode == 0, output[-3000:]
    assert "private namespace, loopback only" in output
    assert checked, "never saw Ray's servers start"
    assert all(interfaces == {"lo"} for interfaces in checked.values()), checked

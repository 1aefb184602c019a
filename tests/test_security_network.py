"""The simulation cannot be reached from the network (issue 19, point 2).

Ray, Flower's simulation engine, opens gRPC servers on every interface and the pinned
Ray 2.55.1 has no setting to change that. ``medgan demo`` therefore runs the simulation
in a private network namespace that holds only loopback. This test starts the real
command and inspects Ray's own processes while they run: their network namespace is not
this machine's, and it has no interface but ``lo``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medgan import private_network

pytestmark = [pytest.mark.slow, pytest.mark.security]


def _descendants(root: int) -> dict[int, str]:
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
        for pid, name in _descendants(demo.pid).items():
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

"""Run a simulation where nothing on the network can reach it: a private network namespace.

Flower's simulation engine is Ray. Every simulation keeps Ray on 127.0.0.1
(``client.ray_guard``); ``medgan demo`` also runs it in a Linux network namespace of its
own that holds only a loopback interface, so Ray's ports exist there and nowhere else
even if that setting were lost. No root
is needed (an unprivileged user namespace maps the user to root inside it); where the
kernel forbids that (some hardened systems), the demo says so and runs as before.
``MEDGAN_PRIVATE_NETWORK=0`` opts out (e.g. to use an existing Ray cluster).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ENV = "MEDGAN_PRIVATE_NETWORK"  # "1" inside the namespace, "0" to opt out
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def _enter() -> None:
    """In the forked child, before exec: a new network namespace (and user namespace if not root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET if uid == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if uid != 0:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def loopback_up() -> None:
    """A new namespace's ``lo`` starts down: bring it up so 127.0.0.1 works inside."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


def inside() -> bool:
    return os.environ.get(ENV) == "1"


def available() -> bool:
    """Whether this system lets us make a private network namespace (checked by trying)."""
    if sys.platform != "linux" or os.environ.get(ENV) == "0":
        return False
    try:
        done = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_enter, timeout=30,  # noqa: PLW1509
                              capture_output=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def run_inside(argv: Sequence[str]) -> int:
    """Run ``python ARGV…`` in a private network namespace; its exit code (output passes through)."""
    env = {**os.environ, ENV: "1"}
    try:
        return subprocess.run([sys.executable, *argv], preexec_fn=_enter, env=env, check=False).returncode  # noqa: PLW1509
    except KeyboardInterrupt:
        return 130

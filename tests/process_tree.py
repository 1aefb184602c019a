"""The processes below a process and the TCP sockets they listen on, read from /proc (tests that
check what a simulation started)."""

from __future__ import annotations

import ipaddress
import os
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


def listening_addresses(pids: set[int]) -> dict[str, str]:
    """Socket inode -> the address each listening TCP socket of ``pids`` is bound to (/proc: state 0A)."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    found = {}
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints host order
            found[fields[9]] = str(ipaddress.ip_address(words))
    return found

"""Whose socket listens on a loopback port, read from /proc (Linux).

Rule kept here: a /health answer on a child's port counts as the child's only when the listening
socket belongs to the child's process group. Another program can take the port between the port
pool's probe and the child's bind; until the child prints that its bind failed, that program's
answers would otherwise read as the child being ready, and requests would go to it.
"""

from __future__ import annotations

import os
from pathlib import Path

LISTEN = "0A"  # the TCP state column of /proc/net/tcp: 0A is LISTEN


def listening_inodes(port: int) -> set[int] | None:
    """Socket inodes listening on `port` (IPv4 and IPv6); None when /proc cannot tell."""
    inodes: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes if readable else None


def group_socket_inodes(pgid: int) -> set[int]:
    """Socket inodes open in any process of process group `pgid` that we may look into."""
    inodes: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for fd in os.listdir(f"/proc/{name}/fd"):
                target = os.readlink(f"/proc/{name}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to look into
    return inodes


def group_listens_on(pgid: int, port: int) -> bool | None:
    """Whether process group `pgid` holds the socket listening on `port`; None when /proc cannot
    tell (then the caller keeps to what it knew before: the child's own words)."""
    listening = listening_inodes(port)
    if listening is None:
        return None
    return bool(listening & group_socket_inodes(pgid))

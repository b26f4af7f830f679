"""Start a command as the leader of its own process group, tied to our life; stop the whole group.

Rules kept here:
- every child starts in a new session (so its process group is its own, and a signal to the group
  reaches whatever it forked) and, on Linux, with PR_SET_PDEATHSIG=SIGKILL, so a supervisor killed
  with SIGKILL leaves no llama-server holding VRAM (ollama #5642 is the bug this prevents);
- stopping is SIGTERM to the group, up to `grace_s` for the group to empty, SIGKILL to the group,
  and the leader is always reaped, even when the caller is being cancelled (callers shield it).

How the death signal is set, and why this way: PR_SET_PDEATHSIG must be set in the child between
fork and exec. anyio.open_process has no preexec_fn, and subprocess's preexec_fn runs Python in the
forked child of a threaded process (asyncio's child watcher and anyio's worker threads), which the
Python docs warn can deadlock. So the child first runs a few lines of Python (`_PDEATHSIG_EXEC`,
about 15 ms) that set the signal with prctl and exec llama-server in place: same pid, same group.
It then checks that its parent is still the supervisor, closing the race where the supervisor died
before prctl. No external tool is needed (setpriv --pdeathsig is util-linux only), and the fork
happens on the event loop's thread, which lives as long as the supervisor: the death signal fires
when the forking *thread* exits, so a child must never be spawned from a worker thread.
Grandchildren (a wrapper script that forks llama-server) get no death signal from us; a stop still
reaches them through the group, and under systemd KillMode=control-group is the backstop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import anyio
import anyio.to_thread
from anyio.abc import Process

from llama_smart_proxy.supervisor.children.launch import Command, child_environment

GROUP_POLL_S = 0.05
"""While stopping, how often to look whether the group's other members are gone."""
KILL_WAIT_S = 1.0
"""After SIGKILL, how long to wait for the group's other members to be gone."""

_PDEATHSIG_EXEC = """\
import ctypes, os, signal, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
    sys.exit("prctl(PR_SET_PDEATHSIG) failed: " + os.strerror(ctypes.get_errno()))
if os.getppid() != parent:
    os._exit(1)  # the supervisor died before prctl took effect
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    print("cannot execute %s: %s" % (argv[0], exc.strerror), file=sys.stderr, flush=True)
    os._exit(127)
"""


def uses_death_signal() -> bool:
    return sys.platform == "linux" and bool(sys.executable)


async def spawn_in_group(command: Command) -> Process:
    """Start `command` with stdout and stderr merged into one pipe, in a new process group."""
    argv = command.argv
    if uses_death_signal():
        argv = [sys.executable, "-I", "-S", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *argv]
    return await anyio.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_environment(os.environ, command.env),
        start_new_session=True,
    )


def signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to the group; False when no member is left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def group_has_live_members(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies do not count).

    A grandchild orphaned by the wrapper's exit is reparented to init; where init does not reap
    (a container's PID 1), it stays a zombie in the group, which kill(0) alone would count.
    """
    if not signal_group(pgid, 0):
        return False
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the fields follow the last ')'
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


async def stop_group(process: Process, grace_s: float) -> None:
    """SIGTERM the group, give it `grace_s` to empty, SIGKILL what is left, reap the leader.

    Callers shield this from cancellation: a child is reaped whatever happens. Looking for the
    group's members reads every /proc entry: it runs in a worker thread, off the event loop.
    """
    pgid = process.pid  # the leader of a new session: its pid is the group's id
    if signal_group(pgid, signal.SIGTERM):
        with anyio.move_on_after(grace_s):
            await process.wait()
            while await _group_alive(pgid):
                await anyio.sleep(GROUP_POLL_S)
    # once the leader is reaped and the group empty its pid may be reused: signal only a live group
    if process.returncode is None or await _group_alive(pgid):
        signal_group(pgid, signal.SIGKILL)
    await process.wait()
    # SIGKILL is delivered at once but a process takes a moment to go; we cannot wait() for a
    # grandchild, so look until the group is empty, for a bounded time (D state can outlast it)
    with anyio.move_on_after(KILL_WAIT_S):
        while await _group_alive(pgid):
            await anyio.sleep(GROUP_POLL_S / 5)


async def _group_alive(pgid: int) -> bool:
    return await anyio.to_thread.run_sync(group_has_live_members, pgid)

"""Child processes that die with their parent: ``PR_SET_PDEATHSIG`` (Linux) set in a ``preexec_fn``.

Used by ``hdm serve`` for its embedded worker and by the worker for the trainer's process group. Only imports the
standard library (the API process never imports torch)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "HDM_PARENT_PID"  # an embedded worker exits when its parent is no longer this pid


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when the process that started it dies (Linux).

    The parent pid is taken before the fork: if the parent already died between fork and prctl, the child
    signals itself (prctl would never fire)."""
    parent = os.getpid()

    def _preexec() -> None:  # pragma: no cover (runs in the child between fork and exec)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return _preexec


def start_run(
    cmd: Sequence[str], *, cwd: Path, log: IO[bytes], env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """A trainer process in a session of its own (so its whole tree can be signalled, process_tree/kill_tree) that
    gets SIGTERM when this process dies; stdout and stderr into ``log``."""
    return subprocess.Popen(
        list(cmd),
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env),
        start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGTERM),
    )


def parent_gone() -> bool:
    """True when ``HDM_PARENT_PID`` is set and the process is no longer its child (orphaned: re-parented)."""
    want = os.environ.get(PARENT_PID_ENV, "")
    return want.isdigit() and os.getppid() != int(want)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) from /proc, or None if the process is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces and parentheses
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def process_tree(root: int) -> dict[int, int]:
    """``root`` and every descendant, pid -> start time. torchrun starts each rank in a session of its own, so
    signalling torchrun's process group does not reach the ranks; the parent links do."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = st
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in table and pid not in tree:
            tree[pid] = table[pid][1]
            frontier.extend(child for child, (ppid, _) in table.items() if ppid == pid)
    return tree


def kill_tree(tree: dict[int, int], sig: int) -> None:
    """Send ``sig`` to every process of a snapshot from ``process_tree`` that is still the same process (start time
    unchanged, so a recycled pid is never hit), and to its process group."""
    for pid, started in tree.items():
        st = _stat(pid)
        if st is None or st[1] != started:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if (
                os.getpgid(pid) == pid
            ):  # a group leader (torchrun, or a rank in its own session): its whole group
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)


def alive(tree: dict[int, int]) -> list[int]:
    return [pid for pid, started in tree.items() if (st := _stat(pid)) is not None and st[1] == started]

"""Child processes that die with their parent: ``PR_SET_PDEATHSIG`` (Linux) set in a ``preexec_fn``.

Used by ``hdm serve`` for its embedded worker and by the worker for the trainer's process group. Only imports the
standard library (the API process never imports torch)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable

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


def parent_gone() -> bool:
    """True when ``HDM_PARENT_PID`` is set and the process is no longer its child (orphaned: re-parented)."""
    want = os.environ.get(PARENT_PID_ENV, "")
    return want.isdigit() and os.getppid() != int(want)

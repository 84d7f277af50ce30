"""hdm_core.allocator: a process that keeps freed memory stops page-faulting the blocks it re-allocates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = r"""
import json, resource, sys
import torch
from hdm_core.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():  # what a forward does to the allocator: 8 activations of 4 MB alive at once, then all freed
    xs = [torch.ones(2**20) for _ in range(8)]
    return sum(float(x[::1024].sum()) for x in xs)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what this tunes")
def test_kept_memory_is_not_faulted_in_again() -> None:
    plain, kept = _faults("plain"), _faults("keep")
    assert kept["kept"] is True
    # plain glibc trims the 32 MB freed at the heap's top and faults it in again the next step (8,192 pages);
    # kept, the same memory is reused
    assert plain["faults"] >= 20 * 4000, plain
    assert kept["faults"] * 20 < plain["faults"], (plain, kept)

"""What `scripts/demo.py` decides from the machine and the data: OpenMP's wait policy, the caption length."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

from hdm_demo.assets import ensure_text_encoder
from hdm_demo.shapes import all_specs
from scripts.demo import TEXT_MAX_LENGTH, cpu_busy_fraction, omp_wait_policy


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_cpu_busy_on_every_core_gets_passive_waits():
    ctx = mp.get_context("spawn")
    spinners = [ctx.Process(target=_spin, args=(20.0,)) for _ in range(os.cpu_count() or 1)]
    for p in spinners:
        p.start()
    try:
        time.sleep(2.0)  # the spinners are running, not still importing
        busy = cpu_busy_fraction()
        policy = omp_wait_policy()
    finally:
        for p in spinners:
            p.terminate()
            p.join()
    assert busy is not None and busy > 0.8
    assert policy == "PASSIVE"


def test_every_caption_fits_the_demo_text_length(tmp_path):
    """A longer caption would be cut, and its last words (the background) lost."""
    from transformers import AutoTokenizer

    ensure_text_encoder(tmp_path / "te", hidden_size=64)
    tok = AutoTokenizer.from_pretrained(tmp_path / "te")
    lengths = [
        len(tok(s.caption, add_special_tokens=False)["input_ids"])
        for s in all_specs(heldout=False) + all_specs(heldout=True)
    ]
    assert max(lengths) <= TEXT_MAX_LENGTH

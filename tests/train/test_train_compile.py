"""`[train] compile = true` and `precision = "auto"` through the real trainer (run_training), on CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from hdm_core.train import run_training
from hdm_core.train.config import load_config

from .conftest import TINY_MODEL, final_weights, read_metrics

STAGE = [{"resolution": 16, "batch_size": 2, "lr": 0.05, "steps": 2, "tread_rate": 0.5}]
COMPILED_REL = (
    1e-4  # inductor fuses and reorders float sums: loss and gradient norm agree to float32 rounding
)
# AdamW's first updates are nearly lr * sign(grad): an element whose gradient is ~0 may step the other way
WEIGHT_REL = 3e-3


def _run(make_config: Callable[..., Path], run_dir: Path, **train: object) -> tuple[list[float], dict]:
    """(loss, grad norm) of each step, and the final weights."""
    cfg = make_config(
        f"{run_dir.name}.toml",
        model=dict(TINY_MODEL),
        train={"checkpoint_every": 100, "keep_last_n": 1, "num_threads": 1, **train},
        stages=STAGE,
    )
    assert run_training(load_config(cfg), run_dir).finished
    log = [r for r in read_metrics(run_dir) if "loss" in r]
    return [v for r in log for v in (r["loss"], r["grad_norm"])], final_weights(run_dir)


def test_compiled_training_equals_eager_and_auto_is_fp32_on_cpu(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    auto_loss, auto_w = _run(make_config, tmp_path / "auto")  # precision "auto" (the default)
    eager_loss, eager_w = _run(make_config, tmp_path / "eager", precision="fp32")
    assert auto_loss == eager_loss and all(torch.equal(auto_w[k], eager_w[k]) for k in eager_w)
    comp_loss, comp_w = _run(make_config, tmp_path / "compiled", precision="fp32", compile=True)
    assert len(comp_loss) == len(eager_loss) == 4
    torch.testing.assert_close(torch.tensor(comp_loss), torch.tensor(eager_loss), rtol=COMPILED_REL, atol=0)
    assert comp_w.keys() == eager_w.keys()  # no "_orig_mod." prefix from the compiled wrapper
    for k in eager_w:
        err = (comp_w[k] - eager_w[k]).norm() / eager_w[k].norm().clamp_min(1e-12)
        assert err < WEIGHT_REL, (k, float(err))

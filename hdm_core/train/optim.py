"""AdamW with per-parameter fan_in lr scaling, the per-stage lr schedule, and the optional weight EMA (spec §6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hdm_core.train.config import OptimizerSection, StageSection


def fan_in(param: Tensor) -> int:
    """Spec §6 "muP" lr: 1-D -> numel; otherwise the product of all but the first dim (Linear in_features,
    conv in_ch*k*k, RoPE freqs [heads, n, 2] -> n*2)."""
    if param.ndim <= 1:
        return max(param.numel(), 1)
    return math.prod(param.shape[1:])


def build_optimizer(model: nn.Module, opt: OptimizerSection) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter and lr = stage lr * lr_scale per group (spec §6).

    The reference gives every parameter its own group; parameters with the same fan_in get the same lr, so they
    share a group here (same update, fewer kernel launches). The fused kernel (torch's AdamW docs: `fused`, CPU and
    CUDA) does the whole update in one pass over each tensor: 7.8 ms vs 27 ms for `foreach` on the 10.7M-parameter
    bench.core "dim256" model, one CPU thread (docs/training.md "Optimizer step").
    """
    by_scale: dict[float, list[Tensor]] = {}
    names: dict[float, list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0 / fan_in(p) if opt.lr_scaling == "fan_in" else 1.0
        by_scale.setdefault(scale, []).append(p)
        names.setdefault(scale, []).append(name)
    groups = [
        {"params": params, "lr_scale": scale, "lr": 0.0, "names": names[scale]}
        for scale, params in by_scale.items()
    ]
    return torch.optim.AdamW(
        groups, lr=0.0, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps, fused=True
    )


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    """The stage's lr times each group's fan_in scale times the schedule's factor."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group["lr_scale"] * factor


def set_stage_hparams(optimizer: torch.optim.Optimizer, stage: StageSection, opt: OptimizerSection) -> None:
    """A stage's own betas / weight decay, or the [optimizer] ones; the optimizer state carries across stages."""
    betas = stage.betas or opt.betas
    wd = stage.weight_decay if stage.weight_decay is not None else opt.weight_decay
    for group in optimizer.param_groups:
        group["betas"] = betas
        group["weight_decay"] = wd


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine to `min_ratio` at `total` (spec §6 AnySchedule)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def stage_steps(stage: StageSection, dataset_len: int, global_batch: int) -> int:
    """Optimizer steps in a stage: `steps`, or `epochs` over the data set rounded up."""
    if stage.steps is not None:
        return stage.steps
    assert stage.epochs is not None  # StageSection sets exactly one
    return max(1, math.ceil(stage.epochs * dataset_len / global_batch))


class Ema:
    """fp32 exponential moving average of the weights (off by default; the reference has none)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

"""Process layout under torchrun (one process = one rank; single process without it) and the collectives we use."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hdm_core.train.config import DeviceName, TrainConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: DeviceName, timeout_s: float) -> tuple[DistInfo, bool]:
    """Reads torchrun's environment; returns the info and whether this call created the process group.

    `timeout_s` bounds every collective (gloo and NCCL alike), explicitly rather than the backend's default: a rank
    that waits longer for the others, e.g. at the barrier after its share of the cache build, fails the run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("train.device: cuda requested but no CUDA device is available")
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if want_cuda else "gloo",
            device_id=device if want_cuda else None,
            timeout=timedelta(seconds=timeout_s),
        )
        created = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, device), created


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel under torchrun; the model itself in a single process."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without torchrun)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_and_sum(mean_of: float, sum_of: float, info: DistInfo) -> tuple[float, float]:
    """(mean over ranks of `mean_of`, sum over ranks of `sum_of`); in float64 so every rank logs the same value."""
    stats = torch.tensor([mean_of, sum_of], dtype=torch.float64, device=info.device)
    if info.distributed:
        dist.all_reduce(stats)
        stats[0] /= info.world_size
    return float(stats[0].item()), float(stats[1].item())


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when any rank says True (every rank must agree, or the next collective hangs)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the weights: every rank must hold the same ones when a snapshot is written."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

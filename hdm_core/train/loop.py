"""The HDM training loop: plain PyTorch, single process or torchrun DDP (spec §6, Part A "training engine").

    python -m hdm_core.train CONFIG.toml --run-dir DIR [--resume] [--max-steps N]
    torchrun --nproc_per_node 4 -m hdm_core.train CONFIG.toml --run-dir DIR          # one machine, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id RUN \\
        -m hdm_core.train CONFIG.toml --run-dir DIR                                    # on each of 2 machines

`run_training(config, run_dir, resume=..., stop_check=...)` is the same thing as a function (for the service).

Determinism: the data a micro-batch reads, its crop offsets and caption dropout, its flow noise/t and its TREAD
routes are all seeded from (seed, stage, position in the stage's global sample stream), never from a running RNG.
A resumed run therefore reproduces an uninterrupted one exactly, and W ranks with grad_accum=1 see the same
micro-batches as one process with grad_accum=W (see `hdm_core.data.StreamLayout`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn

from hdm_core.checkpoint import MODEL_PREFIX, TEXT_LENGTH_KEY, load_checkpoint, save_checkpoint
from hdm_core.codec import Codec, PixelCodec, VaeCodec
from hdm_core.data import CaptionedImageDataset, StageSampler, StreamLayout, make_loader, mix_seed
from hdm_core.flow import flow_loss, sample_t
from hdm_core.model import XUT
from hdm_core.synthetic import generate_dataset, is_generated
from hdm_core.text import TextEncoder, build_toy_text_encoder
from hdm_core.train.config import StageSection, TrainConfig, TrainConfigError, load_config
from hdm_core.train_state import (
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointManager,
    load_training_state,
    save_training_state,
)

logger = logging.getLogger("hdm_core.train")

STATE_VERSION = 1


class TrainingTerminated(BaseException):
    """SIGTERM stopped the run: after a checkpoint at the step it was in, or at once on a second SIGTERM."""


@dataclass(frozen=True)
class TrainingResult:
    run_dir: Path
    step: int  # optimizer steps completed in total
    stage: int  # index of the stage the run ended in
    finished: bool  # every stage ran to its end
    last_loss: float | None
    checkpoint: Path | None  # the newest checkpoint folder written by this call


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


# --- setup ------------------------------------------------------------------------------------------------------


def _setup_distributed(cfg: TrainConfig) -> tuple[DistInfo, bool]:
    """Reads torchrun's environment; returns the info and whether this call created the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("train.device: cuda requested but no CUDA device is available")
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if want_cuda else "gloo", device_id=device if want_cuda else None
        )
        created = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, device), created


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _prepare_assets(cfg: TrainConfig, info: DistInfo) -> None:
    """Rank 0 creates the synthetic data set / toy text encoder if the config asks and they are missing."""
    if info.is_main:
        syn = cfg.data.synthetic
        if syn is not None and not is_generated(cfg.data.path, count=syn.count, size=syn.size, seed=syn.seed):
            logger.info("generating the synthetic data set in %s", cfg.data.path)
            generate_dataset(cfg.data.path, count=syn.count, size=syn.size, seed=syn.seed)
        te = cfg.text_encoder
        if te.build_toy and not (Path(te.path) / "config.json").is_file():
            logger.info("building the toy text encoder in %s", te.path)
            build_toy_text_encoder(te.path, hidden_size=te.toy_hidden_size, num_layers=te.toy_layers)
    _barrier(info)  # multi-node runs need these paths on a shared file system (docs/training.md)


def _build_model(cfg: TrainConfig) -> XUT:
    if cfg.model.init_from:
        loaded = load_checkpoint(cfg.model.init_from, load_codec=False)
        logger.info("fine-tuning from %s", cfg.model.init_from)
        model = loaded.model
    else:
        arch = cfg.resolve_model_config()
        assert arch is not None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
            model = XUT(arch)
    model = model.float().train()
    model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    return model


def _build_codec(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Codec:
    if cfg.codec.kind == "pixel":
        return PixelCodec()
    if cfg.codec.path:
        codec = VaeCodec.from_folder(cfg.codec.path)
    else:  # fine-tuning a released checkpoint: its own `vae.*` weights (spec §9)
        assert cfg.model.init_from is not None
        carried = load_checkpoint(cfg.model.init_from).codec
        if not isinstance(carried, VaeCodec):
            raise TrainConfigError(f"codec.path: {cfg.model.init_from} carries no VAE; name a VAE folder")
        codec = carried
    codec = codec.to(device)
    codec.vae.to(dtype)  # frozen; spec §6 runs TE and VAE in half precision
    return codec


def fan_in(param: Tensor) -> int:
    """Spec §6 "muP" lr: 1-D -> numel; otherwise the product of all but the first dim (Linear in_features,
    conv in_ch*k*k, RoPE freqs [heads, n, 2] -> n*2)."""
    if param.ndim <= 1:
        return max(param.numel(), 1)
    return math.prod(param.shape[1:])


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter and lr = stage lr * lr_scale per group (spec §6).

    The reference gives every parameter its own group; parameters with the same fan_in get the same lr, so they
    share a group here (same update, but the multi-tensor `foreach` kernels apply: ~1 s/step less on a small CPU
    model with 100+ tensors).
    """
    by_scale: dict[float, list[Tensor]] = {}
    names: dict[float, list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0 / fan_in(p) if cfg.optimizer.lr_scaling == "fan_in" else 1.0
        by_scale.setdefault(scale, []).append(p)
        names.setdefault(scale, []).append(name)
    groups = [
        {"params": params, "lr_scale": scale, "lr": 0.0, "names": names[scale]}
        for scale, params in by_scale.items()
    ]
    opt = cfg.optimizer
    return torch.optim.AdamW(
        groups, lr=0.0, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps, foreach=True
    )


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine to `min_ratio` at `total` (spec §6 AnySchedule)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def stage_steps(stage: StageSection, dataset_len: int, global_batch: int) -> int:
    if stage.steps is not None:
        return stage.steps
    assert stage.epochs is not None
    return max(1, math.ceil(stage.epochs * dataset_len / global_batch))


def weights_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _Ema:
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


# --- the loop ---------------------------------------------------------------------------------------------------


class _Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        info: DistInfo,
        stop_check: Callable[[], bool] | None,
        max_steps: int | None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.info = info
        self.stop_check = stop_check
        self.max_steps = max_steps
        self.device = info.device
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.train.precision]
        frozen_dtype = (
            self.amp_dtype if (self.amp_dtype is not None and self.device.type == "cuda") else torch.float32
        )
        self.text_encoder = TextEncoder.from_pretrained(
            cfg.text_encoder.path, device=self.device, dtype=frozen_dtype
        )
        self.codec = _build_codec(cfg, self.device, frozen_dtype)
        self.model = _build_model(cfg).to(self.device)
        mc = self.model.config
        if self.text_encoder.hidden_size != mc.ctx_dim:
            raise TrainConfigError(
                f"text_encoder.path: hidden size {self.text_encoder.hidden_size} != model ctx_dim {mc.ctx_dim}"
            )
        if self.codec.latent_channels != mc.in_channels:
            raise TrainConfigError(
                f"codec: {self.codec.kind} gives {self.codec.latent_channels} channels, model expects {mc.in_channels}"
            )
        self.ddp: nn.Module = self.model
        if info.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
        self.optimizer = build_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.ema = _Ema(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.ckpt = CheckpointManager(run_dir, keep_last_n=cfg.train.keep_last_n)
        base = CaptionedImageDataset(
            cfg.data.path,
            size=cfg.stages[0].resolution,
            captions=cfg.data.captions,
            downsample=self.codec.downsample,
            max_pixels=cfg.data.max_image_pixels,
        )
        self.files = base.files
        self.step = 0
        self.stage = 0
        self.step_in_stage = 0
        self.skipped_images = 0
        self.last_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tb = None

    # -- state ---------------------------------------------------------------------------------------------------
    def resume(self) -> bool:
        entry = self.ckpt.latest_valid()
        if entry is None:
            logger.info("no valid checkpoint in %s: starting from scratch", self.ckpt.dir)
            return False
        state = load_training_state(entry.path / STATE_FILE)
        if state.get("version") != STATE_VERSION:
            raise RuntimeError(
                f"{entry.path}: training state version {state.get('version')} != {STATE_VERSION}"
            )
        sd = {k[len(MODEL_PREFIX) :]: v for k, v in load_file(entry.path / MODEL_FILE).items()}
        self.model.load_state_dict(sd, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.shadow = {k: v.to(self.device) for k, v in state["ema"].items()}
        self.step, self.stage, self.step_in_stage = state["step"], state["stage"], state["step_in_stage"]
        self.skipped_images = state.get("skipped_images", 0)
        rng = state.get("rng", [])
        if state.get("world_size") != self.info.world_size:
            logger.warning(
                "resuming a %s-rank run on %s ranks: data order continues, per-rank RNG is reseeded",
                state.get("world_size"),
                self.info.world_size,
            )
        elif self.info.rank < len(rng):
            _set_rng_state(rng[self.info.rank], self.device)
        if self.info.is_main:
            self._truncate_metrics(self.step)
        logger.info(
            "resumed from %s (step %d, stage %d, step in stage %d)",
            entry.path,
            self.step,
            self.stage,
            self.step_in_stage,
        )
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint (and a torn last line), so the log matches the state."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                kept.append(line)
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{k}\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def save(self) -> None:
        fingerprints = _gather(weights_fingerprint(self.model), self.info)
        rng = _gather(_rng_state(self.device), self.info)
        if not self.info.is_main:
            return
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"ranks hold different weights: {fingerprints}")
        state = {
            "version": STATE_VERSION,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.shadow if self.ema is not None else None,
            "step": self.step,
            "stage": self.stage,
            "step_in_stage": self.step_in_stage,
            "consumed_samples": self.step_in_stage * self._layout(self.cfg.stages[self.stage]).global_batch,
            "skipped_images": self.skipped_images,
            "world_size": self.info.world_size,
            "rng": rng,
        }
        meta = {"step": str(self.step), "stage": self.cfg.stage_name(self.stage), **self._model_metadata()}

        def write(folder: Path) -> None:
            save_checkpoint(folder / MODEL_FILE, self.model, codec=self.codec, metadata=meta)
            if self.ema is not None:
                ema_model = XUT(self.model.config)
                ema_model.load_state_dict({k: v.cpu() for k, v in self.ema.shadow.items()})
                save_checkpoint(folder / EMA_FILE, ema_model, codec=self.codec, metadata=meta)
            save_training_state(folder / STATE_FILE, state)

        info = {
            "stage": self.stage,
            "step_in_stage": self.step_in_stage,
            "world_size": self.info.world_size,
            "rank_fingerprints": fingerprints,
        }
        self.last_checkpoint = self.ckpt.save(self.step, write, info)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _model_metadata(self) -> dict[str, str]:
        """What inference needs to condition the model as it was trained (see HDMPipeline.text_length)."""
        return {TEXT_LENGTH_KEY: str(self.cfg.text_encoder.max_length)}

    def _layout(self, stage: StageSection) -> StreamLayout:
        return StreamLayout(stage.batch_size, stage.grad_accum, self.info.world_size)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("step", "time"):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def _open_tensorboard(self) -> None:
        if not (self.cfg.train.tensorboard and self.info.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning(
                "train.tensorboard is on but tensorboard is not installed (pip install hdm-serve[tensorboard])"
            )
            return
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _should_stop(self) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            return True
        flag = bool(self.stop_check()) if self.stop_check is not None else False
        if self.info.distributed:  # every rank must agree, or the next collective hangs
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def _sample(self) -> None:
        if not self.info.is_main:
            return
        from hdm_core.pipeline import HDMPipeline

        s = self.cfg.sampling
        res = self.cfg.stages[self.stage].resolution
        pipe = HDMPipeline(
            self.model,
            self.codec,
            self.text_encoder,
            device=self.device,
            dtype=torch.float32,
            text_length=self.cfg.text_encoder.max_length,
        )
        try:
            result = pipe.generate(
                list(s.prompts),
                width=res,
                height=res,
                steps=s.steps,
                guidance_scale=s.guidance_scale,
                seed=s.seed,
            )
        finally:
            self.model.train()
        out = self.run_dir / "samples"
        out.mkdir(exist_ok=True)
        from PIL import Image

        grid = Image.new("RGB", (res * len(result.images), res))
        for i, img in enumerate(result.images):
            grid.paste(img, (i * res, 0))
        grid.save(out / f"step-{self.step:08d}.png")

    def _micro_batches(self, stage_idx: int, stage: StageSection) -> Iterator[dict[str, Any]]:
        captions = self.cfg.data.captions
        if stage.caption_dropout is not None:
            captions = captions.model_copy(update={"caption_dropout": stage.caption_dropout})
        dataset = CaptionedImageDataset(
            self.cfg.data.path,
            size=stage.resolution,
            captions=captions,
            downsample=self.codec.downsample,
            max_pixels=self.cfg.data.max_image_pixels,
            files=self.files,
        )
        sampler = StageSampler(
            len(dataset),
            self._layout(stage),
            rank=self.info.rank,
            seed=self.cfg.seed,
            stage=stage_idx,
            start_step=self.step_in_stage,
            shuffle=self.cfg.data.shuffle,
        )
        loader = make_loader(
            dataset, sampler, num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda"
        )
        return iter(loader)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _micro_step(self, batch: dict[str, Any], stage_idx: int, stage: StageSection, micro: int) -> float:
        layout = self._layout(stage)
        slot = layout.slot_start(self.step_in_stage, micro, self.info.rank)
        dev = self.device
        with torch.no_grad():
            pixels = batch["pixels"].to(dev, non_blocking=True)
            enc_gen = torch.Generator(dev).manual_seed(mix_seed(self.cfg.seed, stage_idx, "vae", slot))
            x0 = self.codec.encode(pixels, generator=enc_gen).float()
            # Spec §4: training pads (and truncates) every caption to max_length.
            ctx = self.text_encoder.encode(
                batch["captions"], padding="max_length", max_length=self.cfg.text_encoder.max_length
            ).float()
        noise_gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, stage_idx, "noise", slot))
        obj = self.cfg.objective
        t = sample_t(x0.shape[0], generator=noise_gen, mean=obj.t_logit_mean, std=obj.t_logit_std).to(dev)
        route_gens = None
        if stage.tread_rate > 0:
            route_gens = [
                torch.Generator().manual_seed(mix_seed(self.cfg.seed, stage_idx, "route", slot + i))
                for i in range(x0.shape[0])
            ]
        last = micro == stage.grad_accum - 1
        sync = contextlib.nullcontext() if (last or not self.info.distributed) else self.ddp.no_sync()
        with sync:
            with self._autocast():
                loss = flow_loss(
                    self.ddp,
                    x0,
                    ctx,
                    pos_map=batch["pos_map"].to(dev),
                    addon_info=batch["addon"].to(dev),
                    tread_rate=stage.tread_rate,
                    generator=noise_gen,
                    t=t,
                    route_generators=route_gens,
                )
            self.scaler.scale(loss / stage.grad_accum).backward()
        return float(loss.detach())

    def _set_stage_hparams(self, stage: StageSection) -> None:
        opt = self.cfg.optimizer
        betas = stage.betas or opt.betas
        wd = stage.weight_decay if stage.weight_decay is not None else opt.weight_decay
        for group in self.optimizer.param_groups:
            group["betas"] = betas
            group["weight_decay"] = wd

    def run(self) -> TrainingResult:
        cfg = self.cfg
        self._open_tensorboard()
        progress = None
        finished = False
        try:
            while self.stage < len(cfg.stages):
                stage_idx, stage = self.stage, cfg.stages[self.stage]
                layout = self._layout(stage)
                total = stage_steps(stage, len(self.files), layout.global_batch)
                if self.step_in_stage >= total:
                    self.stage, self.step_in_stage = self.stage + 1, 0
                    continue
                if self._should_stop():
                    break
                self._set_stage_hparams(stage)
                warmup = stage.warmup_steps if stage.warmup_steps is not None else cfg.schedule.warmup_steps
                clip = stage.grad_clip if stage.grad_clip is not None else cfg.train.grad_clip
                latent = stage.resolution // self.codec.downsample
                tokens_per_image = (latent // self.model.config.patch_size) ** 2
                logger.info(
                    "stage %d (%s): %dpx, %d steps, global batch %d, tread %.2f",
                    stage_idx,
                    cfg.stage_name(stage_idx),
                    stage.resolution,
                    total,
                    layout.global_batch,
                    stage.tread_rate,
                )
                if self.info.is_main and sys.stderr.isatty():
                    from tqdm import tqdm

                    progress = tqdm(total=total, initial=self.step_in_stage, desc=cfg.stage_name(stage_idx))
                batches = self._micro_batches(stage_idx, stage)
                stop = False
                while self.step_in_stage < total:
                    t0 = time.perf_counter()
                    factor = lr_factor(
                        self.step_in_stage, total, warmup, cfg.schedule.kind, cfg.schedule.min_lr_ratio
                    )
                    for group in self.optimizer.param_groups:
                        group["lr"] = stage.lr * group["lr_scale"] * factor
                    losses, skipped = [], 0
                    for micro in range(stage.grad_accum):
                        batch = next(batches)
                        skipped += batch["skipped"]
                        losses.append(self._micro_step(batch, stage_idx, stage, micro))
                    self.scaler.unscale_(self.optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self.model.parameters(), clip if clip > 0 else math.inf
                    )
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.update(self.model)
                    loss = sum(losses) / len(losses)
                    stats = torch.tensor([loss, float(skipped)], dtype=torch.float64, device=self.device)
                    if self.info.distributed:
                        dist.all_reduce(stats)
                        stats[0] /= self.info.world_size
                    self.step += 1
                    self.step_in_stage += 1
                    self.skipped_images += int(stats[1].item())
                    self.last_loss = float(stats[0].item())
                    dt = time.perf_counter() - t0
                    if self.step % cfg.train.log_every == 0 or self.step_in_stage == total:
                        self._log(
                            {
                                "step": self.step,
                                "time": time.time(),
                                "stage": stage_idx,
                                "stage_name": cfg.stage_name(stage_idx),
                                "step_in_stage": self.step_in_stage,
                                "resolution": stage.resolution,
                                "loss": self.last_loss,
                                "lr": stage.lr * factor,
                                "grad_norm": float(grad_norm),
                                "images_per_s": layout.global_batch / dt,
                                "tokens_per_s": layout.global_batch * tokens_per_image / dt,
                                "step_time_s": dt,
                                "memory_mb": _memory_mb(self.device),
                                "skipped_images": self.skipped_images,
                                "grad_scale": float(self.scaler.get_scale()),
                            }
                        )
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{self.last_loss:.4f}")
                    if cfg.sampling.every and self.step % cfg.sampling.every == 0:
                        self._sample()
                    stage_done = self.step_in_stage >= total
                    # Decided identically on every rank: save() is collective (fingerprints, RNG states).
                    saved = self.step % cfg.train.checkpoint_every == 0 or stage_done
                    if saved:
                        self.save()
                    if not stage_done and self._should_stop():
                        if not saved:
                            self.save()
                        stop = True
                        break
                del batches
                if progress is not None:
                    progress.close()
                    progress = None
                if stop:
                    break
                self.stage, self.step_in_stage = self.stage + 1, 0
            else:
                finished = True
        finally:
            if progress is not None:
                progress.close()
            if self.tb is not None:
                self.tb.close()
        if finished and self.info.is_main:
            save_checkpoint(
                self.run_dir / "final.safetensors",
                self.model,
                codec=self.codec,
                metadata={"step": str(self.step), **self._model_metadata()},
            )
        return TrainingResult(
            self.run_dir,
            self.step,
            min(self.stage, len(cfg.stages) - 1),
            finished,
            self.last_loss,
            self.last_checkpoint,
        )


# --- entry points -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_stops(stopped: threading.Event) -> Iterator[None]:
    """While training, a first SIGTERM sets `stopped`: the loop saves a checkpoint after the step it is in and
    returns (every rank agrees through _should_stop), so a preempted or cancelled run loses no step. A second
    SIGTERM raises TrainingTerminated at once. Signal handlers exist on the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if stopped.is_set():
            raise TrainingTerminated(f"signal {signum} (second)")
        stopped.set()
        logger.warning("SIGTERM: stopping after a checkpoint at the current step")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_training(
    config: TrainConfig | str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_check: Callable[[], bool] | None = None,
    max_steps: int | None = None,
) -> TrainingResult:
    """Train per `config` into `run_dir` (metrics.jsonl, checkpoints/, samples/, final.safetensors).

    resume: continue from the newest valid checkpoint in run_dir (exactly: same data, noise and loss sequence).
    stop_check: polled after every optimizer step; when it returns True a checkpoint is written and the call
    returns (finished=False). max_steps: stop (with a checkpoint) once this many optimizer steps are done in total.
    Under torchrun every rank calls this; rank 0 writes the files.
    """
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    run_dir = Path(run_dir)
    info, created_pg = _setup_distributed(cfg)
    try:
        torch.set_float32_matmul_precision(cfg.train.matmul_precision)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
            if not resume and CheckpointManager(run_dir).read_manifest():
                raise TrainConfigError(
                    f"--run-dir: {run_dir} already holds checkpoints; pass --resume to continue that run "
                    "or choose a new run folder"
                )
            if not resume and (run_dir / "metrics.jsonl").exists():
                (run_dir / "metrics.jsonl").unlink()
        _prepare_assets(cfg, info)
        stopped = threading.Event()

        def stop() -> bool:
            return stopped.is_set() or (stop_check is not None and bool(stop_check()))

        with _sigterm_stops(stopped):
            trainer = _Trainer(cfg, run_dir, info, stop, max_steps)
            if resume:
                trainer.resume()
            result = trainer.run()
        if created_pg and dist.is_initialized():
            # Every rank finished normally: wait for rank 0's last writes before tearing gloo/NCCL down, so no rank
            # destroys the group while another still uses it (seen as a rank aborting at exit).
            dist.barrier()
        if stopped.is_set() and not result.finished:
            raise TrainingTerminated(
                f"SIGTERM: stopped at step {result.step}, checkpoint {result.checkpoint}"
            )
        return result
    finally:
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hdm_core.train", description="Train an HDM/XUT model.")
    parser.add_argument("config", type=Path, help="TOML training config")
    parser.add_argument(
        "--run-dir", type=Path, required=True, help="output folder (checkpoints, logs, samples)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps in total"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=args.log_level.upper() if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s",
    )
    try:
        result = run_training(args.config, args.run_dir, resume=args.resume, max_steps=args.max_steps)
    except TrainConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except TrainingTerminated as exc:
        logger.warning("terminated by SIGTERM (%s)", exc)
        return 128 + signal.SIGTERM
    if rank == "0":
        print(
            json.dumps(
                {
                    "step": result.step,
                    "stage": result.stage,
                    "finished": result.finished,
                    "loss": result.last_loss,
                    "checkpoint": str(result.checkpoint or ""),
                }
            )
        )
    return 0

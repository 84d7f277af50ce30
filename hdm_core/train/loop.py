"""The HDM training loop: plain PyTorch, one rank of a single process or torchrun DDP run (spec §6).

`Trainer.train_step` is one optimizer step; `Trainer.run` walks the progressive-resolution stages, logs, writes
snapshots and stops on request. `hdm_core.train.run.run_training` sets a run up and calls it.

Determinism: the data a micro-batch reads, its crop offsets and caption dropout, its flow noise/t and its TREAD
routes are all seeded from (seed, stage, position in the stage's global sample stream), never from a running RNG.
A resumed run therefore reproduces an uninterrupted one exactly, and W ranks with grad_accum=1 see the same
micro-batches as one process with grad_accum=W (see `hdm_core.data.StreamLayout`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hdm_core.checkpoint import MODEL_PREFIX, TEXT_LENGTH_KEY, save_checkpoint
from hdm_core.data import CaptionedImageDataset, StageSampler, StreamLayout, make_loader, mix_seed
from hdm_core.flow import flow_loss, sample_t
from hdm_core.model import XUT
from hdm_core.precision import train_precision
from hdm_core.train import components, distributed
from hdm_core.train.adapter_run import AdapterRun
from hdm_core.train.config import StageSection, TrainConfig
from hdm_core.train.distributed import DistInfo
from hdm_core.train.encoders import BatchEncoder
from hdm_core.train.metrics import MetricsLog, memory_mb
from hdm_core.train.optim import Ema, build_optimizer, lr_factor, set_lr, set_stage_hparams, stage_steps
from hdm_core.train.previews import save_preview
from hdm_core.train.run_dir import (
    ADAPTER_FILE,
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    STATE_VERSION,
    RunDir,
    TrainingResult,
    load_training_state,
    save_training_state,
)

logger = logging.getLogger("hdm_core.train")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class Trainer:
    """One rank's training state and loop; `train_step` is one optimizer step."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: RunDir,
        info: DistInfo,
        stop_check: Callable[[], bool] | None,
        max_steps: int | None,
    ) -> None:
        self.cfg, self.run_dir, self.info = cfg, run_dir, info
        self.stop_check, self.max_steps = stop_check, max_steps
        self.device = info.device
        self.precision = train_precision(cfg.train.precision, self.device)
        self.amp_dtype = AMP_DTYPES[self.precision]
        on_gpu_amp = self.amp_dtype is not None and self.device.type == "cuda"
        frozen_dtype = self.amp_dtype if on_gpu_amp else torch.float32
        self.text_encoder = components.build_text_encoder(cfg, self.device, frozen_dtype)
        self.codec = components.build_codec(cfg, self.device, frozen_dtype)
        self.model = components.build_model(cfg).to(self.device)
        components.check_compatible(self.model, self.text_encoder, self.codec)
        self.files = CaptionedImageDataset(
            cfg.data.path,
            size=cfg.stages[0].resolution,
            captions=cfg.data.captions,
            downsample=self.codec.downsample,
            max_pixels=cfg.data.max_image_pixels,
        ).files
        self.encoder = BatchEncoder(cfg, self.codec, self.text_encoder, self.device)
        # An adapter run trains only the adapter (hooked into the frozen base); otherwise the whole model.
        self.adapter = (
            AdapterRun(cfg, self.model, self.files, hash_base=info.is_main) if cfg.adapter else None
        )
        self.trained = self.adapter.network if self.adapter else self.model
        self.ddp = distributed.wrap_ddp(self.adapter.module if self.adapter else self.model, info)
        self.optimizer = build_optimizer(self.trained, cfg.optimizer)
        if cfg.train.compile:  # compiles on a shape's first step; the model's state_dict keys do not change
            self.ddp = torch.compile(self.ddp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema = Ema(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.step = self.stage = self.step_in_stage = self.skipped_images = 0
        self.last_loss: float | None = None
        self.last_snapshot: Path | None = None
        self.metrics = MetricsLog(run_dir.metrics_path, enabled=False)

    def resume(self) -> bool:
        snap = self.run_dir.latest_snapshot()
        if snap is None:
            logger.info("no valid snapshot in %s: starting from scratch", self.run_dir.dir)
            return False
        state = load_training_state(snap.path / STATE_FILE)
        if state.get("version") != STATE_VERSION:
            raise RuntimeError(
                f"{snap.path}: training state version {state.get('version')} != {STATE_VERSION}"
            )
        if self.adapter is not None:
            self.adapter.load(state.get("adapter"), snap.path / ADAPTER_FILE)
        else:
            sd = {k[len(MODEL_PREFIX) :]: v for k, v in load_file(snap.path / MODEL_FILE).items()}
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
            distributed.set_rng_state(rng[self.info.rank], self.device)
        if self.info.is_main:
            self.run_dir.truncate_metrics(self.step)
        logger.info(
            "resumed from %s (step %d, stage %d, step in stage %d)",
            snap.path, self.step, self.stage, self.step_in_stage,
        )  # fmt: skip
        return True

    def save(self) -> None:
        """Collective (fingerprints, RNG states); rank 0 writes the snapshot."""
        fingerprints = distributed.gather(distributed.weights_fingerprint(self.trained), self.info)
        rng = distributed.gather(distributed.rng_state(self.device), self.info)
        if not self.info.is_main:
            return
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"ranks hold different weights: {fingerprints}")
        state = {
            "version": STATE_VERSION,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.shadow if self.ema is not None else None,
            "adapter": self.adapter.state() if self.adapter is not None else None,
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
            save_training_state(folder / STATE_FILE, state)
            if self.adapter is not None:  # the adapter alone, never a copy of the base
                self.adapter.save(folder / ADAPTER_FILE, self.step)
                return
            save_checkpoint(folder / MODEL_FILE, self.model, codec=self.codec, metadata=meta)
            if self.ema is not None:
                ema_model = XUT(self.model.config)
                ema_model.load_state_dict({k: v.cpu() for k, v in self.ema.shadow.items()})
                save_checkpoint(folder / EMA_FILE, ema_model, codec=self.codec, metadata=meta)

        info = {
            "stage": self.stage,
            "step_in_stage": self.step_in_stage,
            "world_size": self.info.world_size,
            "rank_fingerprints": fingerprints,
            **(self.adapter.manifest_entry(ADAPTER_FILE, self.step) if self.adapter else {}),
        }
        self.last_snapshot = self.run_dir.save_snapshot(self.step, write, info)

    def train_step(
        self, batches: Iterator[dict[str, Any]], stage_idx: int, stage: StageSection, factor: float
    ) -> float:
        """One optimizer step (spec §6): `grad_accum` micro-batches of flow-matching loss, clip, AdamW, EMA.

        A micro-batch: pixels (B, 3, S, S) -> x0 (B, C, S/ds, S/ds); captions -> ctx (B, max_length, ctx_dim);
        t (B,). Every generator is seeded from the micro-batch's slot in the stage's global sample stream.
        Returns the gradient norm before clipping; the loss (mean over ranks) lands in `last_loss`.
        """
        set_lr(self.optimizer, stage.lr, factor)
        layout, seed, obj = self._layout(stage), self.cfg.seed, self.cfg.objective
        losses, skipped = [], 0
        for micro in range(stage.grad_accum):
            batch = next(batches)
            skipped += batch["skipped"]
            slot = layout.slot_start(self.step_in_stage, micro, self.info.rank)
            x0, ctx = self.encoder.encode(batch, mix_seed(seed, stage_idx, "vae", slot), stage.resolution)
            noise_gen = torch.Generator().manual_seed(mix_seed(seed, stage_idx, "noise", slot))
            t = sample_t(x0.shape[0], generator=noise_gen, mean=obj.t_logit_mean, std=obj.t_logit_std)
            routes = None
            if stage.tread_rate > 0:
                routes = [
                    torch.Generator().manual_seed(mix_seed(seed, stage_idx, "route", slot + i))
                    for i in range(x0.shape[0])
                ]
            last = micro == stage.grad_accum - 1
            with contextlib.nullcontext() if (last or not self.info.distributed) else self.ddp.no_sync():
                with self._autocast():
                    loss = flow_loss(
                        self.ddp,
                        x0,
                        ctx,
                        pos_map=batch["pos_map"].to(self.device),
                        addon_info=batch["addon"].to(self.device),
                        tread_rate=stage.tread_rate,
                        generator=noise_gen,
                        t=t.to(self.device),
                        route_generators=routes,
                    )
                self.scaler.scale(loss / stage.grad_accum).backward()
            losses.append(float(loss.detach()))
        self.scaler.unscale_(self.optimizer)
        clip = stage.grad_clip if stage.grad_clip is not None else self.cfg.train.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained.parameters(), clip if clip > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.last_loss, skipped_all = distributed.mean_and_sum(
            sum(losses) / len(losses), float(skipped), self.info
        )
        self.step, self.step_in_stage = self.step + 1, self.step_in_stage + 1
        self.skipped_images += int(skipped_all)
        return float(grad_norm)

    def run(self) -> TrainingResult:
        cfg = self.cfg
        tb_dir = self.run_dir.root / "tensorboard" if cfg.train.tensorboard else None
        self.metrics = MetricsLog(
            self.run_dir.metrics_path, enabled=self.info.is_main, tensorboard_dir=tb_dir
        )
        finished = False
        try:
            self.encoder.open_caches(self.run_dir.root, self.files, self.info, self._cache_progress)
            while self.stage < len(cfg.stages):
                stage = cfg.stages[self.stage]
                total = stage_steps(stage, len(self.files), self._layout(stage).global_batch)
                if self.step_in_stage < total and (
                    self._should_stop() or not self._run_stage(self.stage, stage, total)
                ):
                    break
                self.stage, self.step_in_stage = self.stage + 1, 0
            else:
                finished = True
        finally:
            self.metrics.close()
        if finished and self.info.is_main and self.adapter is not None:
            self.adapter.save(self.run_dir.final_adapter_path, self.step)
        elif finished and self.info.is_main:
            save_checkpoint(
                self.run_dir.final_path,
                self.model,
                codec=self.codec,
                metadata={"step": str(self.step), **self._model_metadata()},
            )
        stage_idx = min(self.stage, len(cfg.stages) - 1)
        return TrainingResult(
            self.run_dir.root, self.step, stage_idx, finished, self.last_loss, self.last_snapshot
        )

    def _run_stage(self, stage_idx: int, stage: StageSection, total: int) -> bool:
        """Steps until the stage's end (True) or a stop request (False, after a snapshot)."""
        cfg = self.cfg
        set_stage_hparams(self.optimizer, stage, cfg.optimizer)
        warmup = stage.warmup_steps if stage.warmup_steps is not None else cfg.schedule.warmup_steps
        layout = self._layout(stage)
        tokens_per_image = (stage.resolution // self.codec.downsample // self.model.config.patch_size) ** 2
        name = cfg.stage_name(stage_idx)
        logger.info(
            "stage %d (%s): %dpx, %d steps, global batch %d, tread %.2f",
            stage_idx, name, stage.resolution, total, layout.global_batch, stage.tread_rate,
        )  # fmt: skip
        progress = None
        if self.info.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            progress = tqdm(total=total, initial=self.step_in_stage, desc=name)
        batches = self._micro_batches(stage_idx, stage)
        try:
            while self.step_in_stage < total:
                t0 = time.perf_counter()
                factor = lr_factor(
                    self.step_in_stage, total, warmup, cfg.schedule.kind, cfg.schedule.min_lr_ratio
                )
                grad_norm = self.train_step(batches, stage_idx, stage, factor)
                dt = time.perf_counter() - t0
                if self.step % cfg.train.log_every == 0 or self.step_in_stage == total:
                    self.metrics.write(
                        {
                            "step": self.step,
                            "time": time.time(),
                            "stage": stage_idx,
                            "stage_name": name,
                            "step_in_stage": self.step_in_stage,
                            "resolution": stage.resolution,
                            "loss": self.last_loss,
                            "lr": stage.lr * factor,
                            "grad_norm": grad_norm,
                            "images_per_s": layout.global_batch / dt,
                            "tokens_per_s": layout.global_batch * tokens_per_image / dt,
                            "step_time_s": dt,
                            "memory_mb": memory_mb(self.device),
                            "skipped_images": self.skipped_images,
                            "grad_scale": float(self.scaler.get_scale()),
                        }
                    )
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{self.last_loss:.4f}")
                if cfg.sampling.every and self.step % cfg.sampling.every == 0 and self.info.is_main:
                    self._preview()
                stage_done = self.step_in_stage >= total
                # Decided identically on every rank: save() is collective (fingerprints, RNG states).
                saved = self.step % cfg.train.checkpoint_every == 0 or stage_done
                if saved:
                    self.save()
                if not stage_done and self._should_stop():
                    if not saved:
                        self.save()
                    return False
            return True
        finally:
            del batches
            if progress is not None:
                progress.close()

    def _micro_batches(self, stage_idx: int, stage: StageSection) -> Iterator[dict[str, Any]]:
        data = self.cfg.data
        captions = data.captions
        if stage.caption_dropout is not None:
            captions = captions.model_copy(update={"caption_dropout": stage.caption_dropout})
        dataset = CaptionedImageDataset(
            data.path,
            size=stage.resolution,
            captions=captions,
            downsample=self.codec.downsample,
            max_pixels=data.max_image_pixels,
            files=self.files,
        )
        sampler = StageSampler(
            len(dataset),
            self._layout(stage),
            rank=self.info.rank,
            seed=self.cfg.seed,
            stage=stage_idx,
            start_step=self.step_in_stage,
            shuffle=data.shuffle,
        )
        pin = self.device.type == "cuda"
        return iter(make_loader(dataset, sampler, num_workers=data.num_workers, pin_memory=pin))

    def _cache_progress(self, record: dict[str, Any]) -> None:
        self.metrics.write({"step": self.step, "time": time.time(), "kind": "cache", **record})

    def _layout(self, stage: StageSection) -> StreamLayout:
        return StreamLayout(stage.batch_size, stage.grad_accum, self.info.world_size)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _model_metadata(self) -> dict[str, str]:
        """What inference needs to condition the model as it was trained (see HDMPipeline.text_length)."""
        return {TEXT_LENGTH_KEY: str(self.cfg.text_encoder.max_length)}

    def _should_stop(self) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            return True
        asked = self.stop_check is not None and bool(self.stop_check())
        return distributed.any_rank(asked, self.info)  # every rank calls it: the answer is collective

    def _preview(self) -> None:
        save_preview(
            self.run_dir.root / "samples" / f"step-{self.step:08d}.png",
            self.model,
            self.codec,
            self.text_encoder,
            self.cfg.sampling,
            resolution=self.cfg.stages[self.stage].resolution,
            text_length=self.cfg.text_encoder.max_length,
            device=self.device,
        )

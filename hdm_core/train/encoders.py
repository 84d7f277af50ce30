"""The frozen encoders of a run (codec, text encoder) and their training caches ([cache], hdm_core.data.cache).

`BatchEncoder.encode` turns a micro-batch into (x0, ctx). With the caches on, the latent of a sample is drawn from
its cached Gaussian with the same seed as `VaeCodec.encode` draws it, and its caption's states come from the text
cache; what is not cached (an unreadable image's replacement, variants over the bound) is encoded online.
Under torchrun every rank builds its share of the caches (`BatchEncoder.open_caches`).
The pixel codec has nothing to cache (its "latent" is the crop itself): `[cache] latents` is ignored there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hdm_core.codec import Codec, VaeCodec
from hdm_core.data.cache import (
    FileFacts,
    LatentCache,
    RunPlan,
    StagePlan,
    TextCache,
    module_identity,
    owned,
    plan_run,
    scan_facts,
)
from hdm_core.data.crops import square_crop
from hdm_core.data.dataset import load_image
from hdm_core.text import TextEncoder
from hdm_core.train import distributed
from hdm_core.train.config import TrainConfig
from hdm_core.train.distributed import DistInfo

logger = logging.getLogger(__name__)

BUILD_BATCH = 16  # crops / captions per encoder call while building
Progress = Callable[[dict[str, Any]], None]


class BatchEncoder:
    def __init__(
        self, cfg: TrainConfig, codec: Codec, text_encoder: TextEncoder, device: torch.device
    ) -> None:
        self.cfg, self.codec, self.text_encoder, self.device = cfg, codec, text_encoder, device
        self.max_length = cfg.text_encoder.max_length
        self.latents: LatentCache | None = None
        self.text: TextCache | None = None
        self.plan: RunPlan | None = None
        self.built = {"latents": 0, "text": 0}

    def open_caches(self, run_root: Path, files: list[Path], info: DistInfo, progress: Progress) -> None:
        """Plan the run's samples, open the caches and build what they lack, every rank its share.

        Each rank hashes and measures 1/world_size of the files (`scan_facts`); the facts are gathered, so every
        rank replays the same sample stream (`plan_run`) and encodes only the cache keys it owns (`owned`). The
        barrier after the build waits for the slowest share, within the process group's timeout ([train]
        dist_timeout_s); rank 0 then logs how many records each rank built (a `"cache": "built"` record)."""
        c = self.cfg.cache
        want_latents = c.latents and isinstance(self.codec, VaeCodec)
        if c.latents and not want_latents:
            logger.info("cache.latents: the pixel codec has no latents to cache; reading pixels")
        want_text = c.text and c.text_variants > 0
        if not (want_latents or want_text):
            return
        root = Path(c.dir) if c.dir else run_root / "cache"
        t0 = time.perf_counter()

        def report(record: dict[str, Any]) -> None:
            logger.info("building cache: %s", record)
            progress({**record, "rank": info.rank})

        facts: dict[int, FileFacts] = {}
        for part in distributed.gather(
            scan_facts(files, range(info.rank, len(files), info.world_size)), info
        ):
            facts.update(part)
        self.plan = plan_run(
            [facts[i] for i in range(len(files))],
            cache_stages(self.cfg, len(files), info.world_size),
            seed=self.cfg.seed,
            shuffle=self.cfg.data.shuffle,
            max_variants=c.text_variants if want_text else 1,
        )
        if want_latents:
            assert isinstance(self.codec, VaeCodec)
            vae = self.codec
            self.latents = LatentCache(root, module_identity(vae, [vae.config_json(), str(vae.vae.dtype)]))
            mine = owned(self.plan.image_keys(), info.rank, info.world_size)
            self._build_latents(files, self.latents.missing(self.plan, mine), report)
        if want_text:
            te = self.text_encoder
            identity = module_identity(
                te.model, [sorted(te.tokenizer.get_vocab().items()), str(te.model.dtype)]
            )
            self.text = TextCache(root, identity, self.max_length, self.plan)
            mine = owned(self.plan.caption_keys(), info.rank, info.world_size)
            self._build_text(self.text.missing(mine), report)
        distributed.barrier(info)  # every share is written before any rank reads the caches
        counts = distributed.gather(dict(self.built), info)
        progress(
            {
                "cache": "built",
                "latents": [n["latents"] for n in counts],  # per rank, in rank order
                "text": [n["text"] for n in counts],
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        logger.info("caches ready in %.1fs: built per rank %s", time.perf_counter() - t0, counts)

    def _build_latents(
        self, files: list[Path], todo: dict[str, tuple[int, list[tuple[int, int]]]], progress: Progress
    ) -> None:
        assert self.latents is not None and isinstance(self.codec, VaeCodec)
        total = len(todo)
        for done, (sha, (index, crops)) in enumerate(todo.items(), 1):
            img = load_image(files[index], self.cfg.data.max_image_pixels)
            moments: dict[tuple[int, int], Tensor] = {}
            chunks = [
                same[i : i + BUILD_BATCH]
                for size in sorted({s for s, _ in crops})
                for same in [[c for c in crops if c[0] == size]]
                for i in range(0, len(same), BUILD_BATCH)
            ]
            for chunk in chunks:
                pixels = torch.stack([square_crop(img, s, o).pixels for s, o in chunk]).to(self.device)
                for key, m in zip(chunk, self.codec.encode_moments(pixels), strict=True):
                    moments[key] = m
            self.latents.add(sha, moments)
            self.built["latents"] += len(crops)
            if done == total or done % 50 == 0:
                progress({"cache": "latents", "done": done, "total": total, "crops": self.built["latents"]})

    def _build_text(self, todo: dict[str, dict[str, str]], progress: Progress) -> None:
        assert self.text is not None
        items = [(owner, variant, text) for owner, vs in sorted(todo.items()) for variant, text in vs.items()]
        for i in range(0, len(items), BUILD_BATCH):
            chunk = items[i : i + BUILD_BATCH]
            states = self._encode_text([text for _, _, text in chunk])
            by_owner: dict[str, dict[str, Tensor]] = {}
            for (owner, variant, _), state in zip(chunk, states, strict=True):
                by_owner.setdefault(owner, {})[variant] = state
            for owner, entries in by_owner.items():
                self.text.add(owner, entries)
            self.built["text"] += len(chunk)
            progress({"cache": "text", "done": i + len(chunk), "total": len(items)})

    def _encode_text(self, captions: list[str]) -> Tensor:
        # Spec §4: training pads (and truncates) every caption to max_length.
        return self.text_encoder.encode(captions, padding="max_length", max_length=self.max_length)

    @torch.no_grad()
    def encode(self, batch: dict[str, Any], codec_seed: int, size: int) -> tuple[Tensor, Tensor]:
        """pixels (B, 3, S, S) -> x0 (B, C, S/ds, S/ds) (noise from `codec_seed`); captions -> ctx (B, L, D)."""
        generator = torch.Generator(self.device).manual_seed(codec_seed)
        moments = self._cached_latents(batch, size)
        if moments is not None:
            x0 = self.codec.sample_moments(moments.to(self.device), generator=generator)  # type: ignore[attr-defined]
        else:
            pixels = batch["pixels"].to(self.device, non_blocking=True)
            x0 = self.codec.encode(pixels, generator=generator)
        ctx = self._cached_text(batch["captions"])
        if ctx is None:
            ctx = self._encode_text(batch["captions"])
        return x0.float(), ctx.to(self.device).float()

    def _cached_latents(self, batch: dict[str, Any], size: int) -> Tensor | None:
        if self.latents is None or self.plan is None:
            return None
        found = [
            self.latents.get(self.plan.image_sha[i], size, o)
            for i, o in zip(batch["indices"], batch["offsets"], strict=True)
        ]
        return None if any(m is None for m in found) else torch.stack(found)  # type: ignore[arg-type]

    def _cached_text(self, captions: list[str]) -> Tensor | None:
        if self.text is None:
            return None
        found = [self.text.get(c) for c in captions]
        return None if any(s is None for s in found) else torch.stack(found)  # type: ignore[arg-type]


def cache_stages(cfg: TrainConfig, num_files: int, world_size: int) -> list[StagePlan]:
    """Every stage's sample stream as the trainer reads it (sizes, steps, layout, caption transform)."""
    from hdm_core.data.stream import StreamLayout
    from hdm_core.train.optim import stage_steps

    out = []
    for i, stage in enumerate(cfg.stages):
        layout = StreamLayout(stage.batch_size, stage.grad_accum, world_size)
        captions = cfg.data.captions
        if stage.caption_dropout is not None:
            captions = captions.model_copy(update={"caption_dropout": stage.caption_dropout})
        steps = stage_steps(stage, num_files, layout.global_batch)
        out.append(StagePlan(i, stage.resolution, steps, layout, captions))
    return out

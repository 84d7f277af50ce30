"""Text-to-image pipeline: prompts in, PIL images and their seeds out (spec §8)."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .batching import BatchCallback, ImageJob, sample_rows
from .checkpoint import load_checkpoint, trained_text_length
from .codec import Codec
from .compile import CompileMode, compile_model
from .config import ScheduleName
from .edit import EditInfo, EditPlan, EditSpec, plan_edit
from .model import XUT
from .precision import cast_model, resolve_dtype
from .rope import position_map
from .sampler import Conditioning, StepCallback, get_sampler, guided_velocity, timesteps
from .samplers.schedules import (
    TunedSchedule,
    explicit_timesteps,
    load_schedule_file,
    own_knots,
    schedule_file,
)
from .text import TextEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Camera:
    """Position-map camera (spec §2): shifts are added, then everything is divided by zoom."""

    x_shift: float = 0.0
    y_shift: float = 0.0
    zoom: float = 1.0


@dataclass(frozen=True)
class TreadGuidance:
    """TREAD as autoguidance (spec §3): the uncond branch runs the routed, weaker model."""

    cond_rate: float = 0.0
    uncond_rate: float = 0.0


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    latents: Tensor
    # Set for image-to-image / inpainting: mode, strength, ... for the parameters text.
    edit: EditInfo | None = None
    # The schedule's times from 1 to 0 (an edit starts part-way along them): what `tuned` meant for this model.
    times: tuple[float, ...] = ()


def to_pil(images: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL RGB images."""
    arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def initial_noise(seeds: list[int], shape: tuple[int, int, int], device: torch.device) -> Tensor:
    """One CPU fp32 generator per image (spec §8), so image i depends on its own seed only. -> [B, C, h, w]."""
    noise = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.cat(noise).to(device)


def _routing_generators(seeds: list[int]) -> list[torch.Generator]:
    # Separate streams from the noise generators; only used when a branch routes tokens.
    return [torch.Generator("cpu").manual_seed((s + 0x5EED) % 2**63) for s in seeds]


def _sampler_generators(seeds: list[int]) -> list[torch.Generator]:
    # The noise a stochastic sampler adds while stepping: one more stream per image, apart from the other two.
    return [torch.Generator("cpu").manual_seed((s + 0xA5CE57) % 2**63) for s in seeds]


def sample_latents(
    model: XUT,
    noise: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    *,
    steps: int,
    guidance_scale: float,
    sampler: str = "euler",
    shift: float = 1.0,
    schedule: ScheduleName | None = None,
    callback: StepCallback | None = None,
    seeds: list[int] | None = None,
    tuned: TunedSchedule | None = None,
) -> Tensor:
    """Integrate the guided velocity field from noise [B, C, h, w] (t = 1) to a latent (t = 0). `schedule` None is
    the sampler's default; `seeds` (one per row, default 0..B-1) seed a stochastic sampler's noise; `tuned`: the
    model's own knots for the `tuned` schedule (None: the shipped ones)."""
    entry = get_sampler(sampler)
    velocity = guided_velocity(model, cond, uncond, guidance_scale)
    dtype = next(model.parameters()).dtype
    gens = _sampler_generators(seeds or list(range(noise.shape[0]))) if entry.stochastic else None
    # The ODE state stays fp32; the network runs in its own dtype.
    return entry(
        lambda x, t: velocity(x.to(dtype), t).float(),
        noise.float(),
        timesteps(
            steps,
            shift=shift,
            schedule=schedule or entry.default_schedule,
            tuned_knots=own_knots(tuned, sampler),
        ),
        callback=callback,
        generators=gens,
    )


class HDMPipeline:
    """XUT + codec + text encoder, loaded once, on one device and dtype."""

    def __init__(
        self,
        model: XUT,
        codec: Codec,
        text_encoder: TextEncoder,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = "auto",
        text_length: int | None = None,
        tuned: TunedSchedule | None = None,
    ) -> None:
        """`tuned`: the model's own knots for the `tuned` schedule (hdm_core.samplers.tuning; None: the shipped
        ones). `text_length`: pad (and truncate) the prompt and the negative prompt to this many tokens, as the model was
        trained (spec §4: training pads every caption to max_length, and pad states enter XUT unmasked, so a model
        trained on short captions reads them). None: the reference's inference padding (to the longest prompt; no
        padding for one prompt), right for the released weights. `dtype`: see `precision.resolve_dtype`."""
        if text_length is not None and text_length < 1:
            raise ValueError(f"text_length must be >= 1 or None, got {text_length}")
        self.text_length = text_length
        self.tuned = tuned
        self._schedule_file: Path | None = None
        self._schedule_stamp: tuple[int, int, int] | None = None
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = cast_model(model, self.dtype, self.device).eval()
        self.net: torch.nn.Module = self.model  # what sampling calls: the model or its compiled wrapper
        self.codec = codec.to(self.device)
        self.text_encoder = text_encoder
        if text_encoder.hidden_size != model.config.ctx_dim:
            raise ValueError(
                f"text encoder width {text_encoder.hidden_size} != model ctx_dim {model.config.ctx_dim}"
            )

    @classmethod
    def from_paths(
        cls,
        checkpoint: str | Path,
        text_encoder: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = "auto",
        vae: str | Path | None = None,
    ) -> HDMPipeline:
        """A checkpoint file (with its VAE inside, or pixel space, or `vae` = a diffusers folder) + an LM folder."""
        from .codec import VaeCodec

        dtype = resolve_dtype(dtype, device)
        # fp32 first: __init__ casts with cast_model, which keeps the frequency tensors exact.
        loaded = load_checkpoint(checkpoint, device=device, dtype=torch.float32)
        codec = VaeCodec.from_folder(vae) if vae is not None else loaded.codec
        if codec is None:
            raise ValueError(f"{checkpoint} carries no VAE and is not a pixel-space model: pass vae=<folder>")
        if isinstance(codec, VaeCodec) and dtype != torch.float32:
            codec.vae.to(dtype)
        te = TextEncoder.from_pretrained(text_encoder, device=device, dtype=dtype)
        pipe = cls(
            loaded.model,
            codec,
            te,
            device=device,
            dtype=dtype,
            text_length=trained_text_length(loaded.metadata),
        )
        pipe._schedule_file = schedule_file(checkpoint)
        pipe.refresh_tuned_schedule()
        return pipe

    def refresh_tuned_schedule(self) -> bool:
        """Re-read the checkpoint's tuned schedule (`schedule_file`) if the file changed since it was read, so a
        long-lived pipeline picks up `hdm tune-schedule`'s result without reloading the model. A malformed file is
        logged and ignored (`tuned` then uses the shipped knots): a schedule never stops a model from sampling.
        Returns whether `tuned` was re-read."""
        if self._schedule_file is None:
            return False
        try:
            st = self._schedule_file.stat()
            # write_tuned_schedule replaces the file, so a new search is a new inode even within one mtime tick
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_ino, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._schedule_stamp:
            return False
        self._schedule_stamp = stamp
        try:
            self.tuned = load_schedule_file(self._schedule_file)
        except (OSError, ValueError) as exc:
            log.warning("ignoring the tuned schedule: %s", exc)
            self.tuned = None
        return True

    def _encode(self, prompts: list[str]) -> Tensor:
        if self.text_length is None:
            return self.text_encoder.encode(prompts)
        return self.text_encoder.encode(prompts, padding="max_length", max_length=self.text_length)

    def context_length(self, prompt: str) -> int:
        """Text tokens of ``prompt``'s context as `_encode` builds it for a job alone: jobs whose prompts (and
        negative prompts) have equal lengths share one network batch in `generate_batch`, others cannot."""
        return self.text_length or self.text_encoder.token_count(prompt)

    @property
    def downsample(self) -> int:
        return self.codec.downsample

    @property
    def size_multiple(self) -> int:
        return self.codec.downsample * self.model.config.patch_size

    def check_size(self, width: int, height: int) -> None:
        m = self.size_multiple
        if width % m or height % m or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of {m}, got {width}x{height}")

    def compile(self, mode: CompileMode = "default") -> None:
        """Sample through a torch.compile'd XUT from now on ("off" restores eager); see `warm_up`."""
        self.net = compile_model(self.model, mode, device=self.device)

    def warm_up(self, width: int, height: int, *, images: int = 1, guidance_scale: float = 3.0) -> None:
        """One sampling step at this size and batch, so a compiled network has its graph before the first job.
        Prompts of another token length (text_length None) still compile once more on first use."""
        self.generate_batch(
            [ImageJob("", seed=0, n=images)],
            width=width,
            height=height,
            steps=1,
            guidance_scale=guidance_scale,
            decode=False,
        )

    def _conditioning(
        self, ctx: Tensor, pos: Tensor, addon: Tensor, rate: float, seeds: list[int]
    ) -> Conditioning:
        return Conditioning(
            ctx.to(self.device, self.dtype),
            pos,
            addon,
            rate,
            _routing_generators(seeds) if rate > 0 else None,
        )

    def generate(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str = "",
        n: int = 1,
        width: int = 1024,
        height: int = 1024,
        steps: int = 24,
        guidance_scale: float = 3.0,
        seed: int | None = None,
        sampler: str = "euler",
        shift: float = 1.0,
        schedule: ScheduleName | None = None,
        camera: Camera = Camera(),
        tread: TreadGuidance = TreadGuidance(),
        callback: StepCallback | None = None,
        edit: EditSpec | None = None,
    ) -> GenerationResult:
        """`n` images per prompt; image i uses seed + i and is reproduced exactly by a batch of one with that seed.
        One job through `generate_batch`; a callback raising SamplingCancelled stops it.
        `edit`: image-to-image / inpainting from an init image (hdm_core.edit)."""
        if seed is None:
            seed = random.randrange(0, 2**32)
        job = ImageJob(prompt, seed=seed, negative_prompt=negative_prompt, n=n, edit=edit)
        step_cb = None if callback is None else (lambda i, total, _active: callback(i, total))
        (result,) = self.generate_batch(
            [job],
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            shift=shift,
            schedule=schedule,
            camera=camera,
            tread=tread,
            callback=step_cb,
        )
        if result is None:
            raise RuntimeError("a single job cannot be dropped from its own batch")
        return result

    def generate_batch(
        self,
        jobs: Sequence[ImageJob],
        *,
        width: int = 1024,
        height: int = 1024,
        steps: int = 24,
        guidance_scale: float = 3.0,
        sampler: str = "euler",
        shift: float = 1.0,
        schedule: ScheduleName | None = None,
        camera: Camera = Camera(),
        tread: TreadGuidance = TreadGuidance(),
        callback: BatchCallback | None = None,
        decode: bool = True,
        sigmas: Sequence[float] | None = None,
    ) -> list[GenerationResult | None]:
        """Several jobs that share every setting but prompt, negative prompt, seed and n, as one network batch.

        Each job's images equal the same job run alone (its own noise and routing generators, its own text
        encoding). Jobs whose encoded prompts differ in token count cannot share a batch without changing their
        outputs (pad tokens enter the XUT unmasked), so they run as consecutive sub-batches of equal shape.
        `callback(step, total, active)` gets the indices of the jobs still sampling in the current sub-batch and
        returns the indices to cancel (or None): their rows leave the batch at once and their result is None.
        Raising SamplingCancelled from it stops every job. A job with an `edit` (its own init image and start time)
        runs as a sub-batch of its own. `sigmas`: explicit times from 1 to 0, in place of steps, schedule and shift
        (as diffusers pipelines take `sigmas`; hdm_core.samplers.tuning searches schedules with it)."""
        self.check_size(width, height)
        entry = get_sampler(sampler)
        ts_full = (
            timesteps(
                steps,
                shift=shift,
                schedule=schedule or entry.default_schedule,
                tuned_knots=own_knots(self.tuned, sampler),
            )
            if sigmas is None
            else explicit_timesteps(sigmas)
        )
        h, w = height // self.downsample, width // self.downsample
        encoded = []
        for job in jobs:
            b = (
                len(job.prompts) * job.n
            )  # its seed was checked when the ImageJob was made (config.check_seed)
            cond = self._encode(list(job.prompts)).repeat_interleave(job.n, dim=0)
            uncond = self._encode([job.negative_prompt]).expand(b, -1, -1) if guidance_scale != 1.0 else None
            encoded.append((cond, uncond))
        groups: dict[tuple, list[int]] = {}
        for j, (cond, uncond) in enumerate(encoded):
            solo = None if jobs[j].edit is None else j
            groups.setdefault((cond.shape[1], None if uncond is None else uncond.shape[1], solo), []).append(
                j
            )
        latents: list[Tensor | None] = [None] * len(jobs)
        plans: dict[int, EditPlan] = {}
        for members in groups.values():
            seeds = [s for j in members for s in jobs[j].seeds]
            rows_job = [j for j in members for _ in jobs[j].seeds]
            b = len(seeds)
            pos = position_map(
                h, w, x_shift=camera.x_shift, y_shift=camera.y_shift, zoom=camera.zoom, device=self.device
            ).expand(b, -1, -1)
            addon = torch.full((b,), math.log(width / height), device=self.device)
            cond = self._conditioning(
                torch.cat([encoded[j][0] for j in members]), pos, addon, tread.cond_rate, seeds
            )
            uncond = None
            if guidance_scale != 1.0:
                ctx = torch.cat([encoded[j][1] for j in members])
                uncond = self._conditioning(ctx, pos, addon, tread.uncond_rate, seeds)
            noise = initial_noise(seeds, (self.model.config.in_channels, h, w), self.device)
            ts, project = ts_full, None
            edit = jobs[members[0]].edit
            if edit is not None:
                plan = plans[members[0]] = plan_edit(edit, self.codec, noise, ts, width=width, height=height)
                noise, ts, project = plan.start, plan.ts, plan.project
            out, rows_job = sample_rows(
                self.net,
                noise,
                rows_job,
                cond,
                uncond,
                ts,
                guidance_scale=guidance_scale,
                sampler=entry,
                callback=callback,
                project=project,
                generators=_sampler_generators(seeds) if entry.stochastic else None,
            )
            for j in members:
                if j in rows_job:
                    latents[j] = out[[r for r, owner in enumerate(rows_job) if owner == j]]
        results: list[GenerationResult | None] = []
        times = tuple(ts_full.tolist())
        for j, (job, lat) in enumerate(zip(jobs, latents, strict=True)):
            if lat is None:
                results.append(None)
                continue
            plan = plans.get(j)
            images = []
            if decode:
                pixels = self.codec.decode(lat.to(self.dtype))
                images = to_pil(pixels if plan is None else plan.composite(pixels))
            info = None if plan is None else plan.info
            results.append(
                GenerationResult(images=images, seeds=job.seeds, latents=lat, edit=info, times=times)
            )
        return results

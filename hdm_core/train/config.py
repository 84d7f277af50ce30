"""The TOML training config: one set of frozen pydantic models, validated once at the boundary.

Every error is a `TrainConfigError` (a ValueError) naming the offending field, e.g. ``stages[1].batch_size``.
Relative paths are resolved against `base_dir` (the current directory unless given). See docs/training.md and
configs/demo-pixel.toml for a complete example.

This module imports no torch: the API's train-job schema reuses the section models.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hdm_core.config import PRESETS, XUTConfig
from hdm_core.data.captions import CaptionConfig, Probability

Precision = Literal["auto", "fp32", "bf16", "fp16"]  # auto: hdm_core.precision.default_train_precision
LrScaling = Literal["fan_in", "none"]
ScheduleKind = Literal["cosine", "constant"]
DeviceName = Literal["auto", "cpu", "cuda"]

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
# TOML and JSON give lists; the models keep tuples (frozen, hashable). Strict(False) only lets the container be a
# list: the items stay strict.
Betas = Annotated[tuple[Beta, Beta], Strict(False)]


class TrainConfigError(ValueError):
    """The training config is invalid; the message names the field."""


class Section(BaseModel):
    """Frozen, unknown keys rejected, no type coercion (`"3"` is not an int, `true` is not a number)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class ModelSection(Section):
    """Exactly one of `preset`, `arch` (a full XUTConfig dict) or `init_from` (fine-tune a checkpoint).
    `overrides` (a partial XUTConfig dict) is applied on top of a preset."""

    preset: str | None = None
    arch: dict[str, Any] | None = None
    overrides: dict[str, Any] | None = None
    init_from: str | None = None
    gradient_checkpointing: bool = False

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; known: {sorted(PRESETS)}")
        return v

    @field_validator("arch")
    @classmethod
    def _valid_arch(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            _xut(lambda: XUTConfig.from_dict(v))
        return v

    @field_validator("overrides")
    @classmethod
    def _valid_overrides(cls, v: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if v is None:
            return v
        preset = info.data.get("preset")
        if not preset:
            raise ValueError("only allowed together with model.preset")
        _xut(lambda: PRESETS[preset].replace(**v))
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        chosen = [k for k in ("preset", "arch", "init_from") if getattr(self, k)]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of preset, arch, init_from (got {chosen or 'none'})")
        return self


def _xut(build: Any) -> None:
    try:
        build()
    except (ValueError, TypeError) as exc:  # TypeError: replace() got an unknown field
        raise ValueError(str(exc)) from None


class TextEncoderSection(Section):
    path: Annotated[str, Field(min_length=1, description="a local folder")]
    max_length: PositiveInt = 256  # spec §4: training pads (and truncates) every caption to max_length


class CodecSection(Section):
    kind: Literal["pixel", "vae"] = "pixel"
    path: str | None = None  # diffusers AutoencoderKL folder; for kind = "vae" without it, init_from's VAE


class DataSection(Section):
    path: Annotated[str, Field(min_length=1)]
    num_workers: NonNegativeInt = 2
    shuffle: bool = True
    max_image_pixels: PositiveInt = 64 * 1024 * 1024
    captions: CaptionConfig = CaptionConfig()


class OptimizerSection(Section):
    """AdamW on every parameter with weight decay; with `lr_scaling = "fan_in"` each parameter's lr is
    lr / fan_in (spec §6 "muP" lr: 1-D -> numel, 2-D -> in_features, conv -> in_ch*k*k, RoPE freqs -> h*2)."""

    lr_scaling: LrScaling = "fan_in"
    betas: Betas = (0.9, 0.98)
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.02
    eps: Annotated[float, Field(gt=0.0)] = 1e-8


class ScheduleSection(Section):
    """Per stage: linear warmup over warmup_steps, then cosine down to min_lr_ratio * lr at the stage's end."""

    kind: ScheduleKind = "cosine"
    warmup_steps: NonNegativeInt = 1000
    min_lr_ratio: Probability = 0.01


class ObjectiveSection(Section):
    """Flow-matching time sampling: t = sigmoid(N(t_logit_mean, t_logit_std)) (spec §6; SD3's logit-normal).

    The reference trains with (0, 1). A positive mean spends more steps at high noise, where composition is decided;
    small images of flat shapes (the CPU demo) need it, as large images do in SD3's resolution shift.
    """

    t_logit_mean: Annotated[float, Field(ge=-4.0, le=4.0)] = 0.0
    t_logit_std: Annotated[float, Field(gt=0.0, le=4.0)] = 1.0


class SamplingSection(Section):
    every: NonNegativeInt = 0  # optimizer steps between preview grids; 0 = never
    prompts: Annotated[tuple[str, ...], Strict(False)] = ()
    steps: PositiveInt = 16
    guidance_scale: float = 3.0
    seed: int = 0

    @model_validator(mode="after")
    def _prompts_when_sampling(self) -> SamplingSection:
        if self.every > 0 and not self.prompts:
            raise ValueError("prompts are needed when every > 0")
        return self


# Mirrors `hdm_core.adapters.network.AdapterConfig` (no torch here; tests/train/test_adapter_config.py checks they agree).
AdapterAlgorithm = Literal["lokr", "lora", "loha"]
ADAPTER_TARGETS: tuple[str, ...] = ("*.attn.qkv", "*.attn.out", "*.xattn.*", "*.mlp.*")
# HDM's fine-tuning recipe (spec §6 "finetune"), used where the config leaves these unset and [adapter] is present.
ADAPTER_RECIPE_LR = 0.1
ADAPTER_RECIPE_BETAS = (0.9, 0.95)
ADAPTER_RECIPE_WARMUP = 100
AdapterSaveDtype = Literal["fp16", "bf16", "fp32"]


class AdapterSection(Section):
    """A LyCORIS adapter on the frozen `model.init_from`; defaults = HDM's recipe (LoKr, factor 4, full matrix,
    norms trained). `rank`/`alpha`: LoRA/LoHa size; `factor` -1 = balanced; `targets`: fnmatch over XUT module
    names. `trigger_words`, `caption_sample` (default: the data set's first caption) go into the file's metadata.
    `save_dtype`: the adapter files' precision (fp16 as the released checkpoint and most shared LyCORIS files: half
    the size of fp32); training keeps fp32 weights, and resume reads those from the training state."""

    algorithm: AdapterAlgorithm = "lokr"
    rank: PositiveInt = 8
    alpha: Annotated[float, Field(gt=0.0)] = 4.0
    factor: int = 4
    full_matrix: bool = True
    train_norm: bool = True
    targets: Annotated[
        tuple[Annotated[str, Field(min_length=1)], ...], Strict(False), Field(min_length=1)
    ] = ADAPTER_TARGETS
    trigger_words: Annotated[tuple[str, ...], Strict(False)] = ()
    caption_sample: str | None = None
    base_name: str | None = None  # the base model's name in the file's metadata; default: init_from's stem
    save_dtype: AdapterSaveDtype = "fp16"

    @field_validator("factor")
    @classmethod
    def _valid_factor(cls, v: int) -> int:
        if v != -1 and v < 2:
            raise ValueError("must be -1 (balanced) or an integer >= 2")
        return v

    def adapter_config(self) -> dict[str, Any]:
        """The fields of `hdm_core.adapters.network.AdapterConfig` (`AdapterConfig.from_dict(section.adapter_config())`)."""
        return self.model_dump(
            mode="json", exclude={"trigger_words", "caption_sample", "base_name", "save_dtype"}
        )


class CacheSection(Section):
    """Training caches (hdm_core.data.cache) under `dir` (default RUN_DIR/cache; share it between runs).
    `text_variants`: at most this many variants of a caption the run reads are cached, others encoded online."""

    latents: bool = False
    text: bool = False
    dir: str | None = None
    text_variants: NonNegativeInt = 8


class TrainSection(Section):
    precision: Precision = "auto"
    compile: bool = False  # torch.compile the training forward and backward (hdm_core.compile), opt-in
    device: DeviceName = "auto"
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0  # 0 = no clipping
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # 0 = no weight EMA (the reference has none)
    log_every: PositiveInt = 1
    checkpoint_every: PositiveInt = 500
    keep_last_n: PositiveInt = 3
    tensorboard: bool = False
    matmul_precision: Literal["highest", "high", "medium"] = "high"
    num_threads: NonNegativeInt = 0  # torch intra-op threads per process; 0 = torch's default
    dist_timeout_s: PositiveInt = 1800  # init_process_group's timeout (the cache build waits in it)


class StageSection(Section):
    """One progressive-resolution stage; unset optional fields inherit the global sections."""

    resolution: Annotated[int, Field(ge=8)]
    batch_size: PositiveInt  # per rank, per micro-step
    lr: Annotated[float, Field(gt=0.0)]
    steps: PositiveInt | None = None
    epochs: Annotated[float, Field(gt=0.0)] | None = None
    name: str | None = None
    grad_accum: PositiveInt = 1
    tread_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    caption_dropout: Probability | None = None
    warmup_steps: NonNegativeInt | None = None
    betas: Betas | None = None
    weight_decay: Annotated[float, Field(ge=0.0)] | None = None
    grad_clip: Annotated[float, Field(ge=0.0)] | None = None

    @model_validator(mode="after")
    def _one_length(self) -> StageSection:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps, epochs")
        return self


class TrainConfig(Section):
    model: ModelSection
    text_encoder: TextEncoderSection
    data: DataSection
    stages: Annotated[tuple[StageSection, ...], Strict(False), Field(min_length=1)]
    codec: CodecSection = CodecSection()
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    objective: ObjectiveSection = ObjectiveSection()
    sampling: SamplingSection = SamplingSection()
    train: TrainSection = TrainSection()
    adapter: AdapterSection | None = None
    cache: CacheSection = CacheSection()
    seed: int = 20090220  # the reference's seed_everything value (spec §6)
    source: str = ""  # where the config came from (informational)

    @model_validator(mode="before")
    @classmethod
    def _adapter_recipe_defaults(cls, data: Any) -> Any:
        """With [adapter], unset lr / betas / warmup take HDM's fine-tuning recipe instead of pretraining's."""
        if not isinstance(data, dict) or data.get("adapter") is None:
            return data
        data, opt = dict(data), dict(data.get("optimizer") or {})
        opt.setdefault("betas", list(ADAPTER_RECIPE_BETAS))
        sched = dict(data.get("schedule") or {})
        sched.setdefault("warmup_steps", ADAPTER_RECIPE_WARMUP)
        stages = data.get("stages")
        if isinstance(stages, list | tuple):
            data["stages"] = [{"lr": ADAPTER_RECIPE_LR, **s} if isinstance(s, dict) else s for s in stages]
        return {**data, "optimizer": opt, "schedule": sched}

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.adapter is not None and not self.model.init_from:
            raise ValueError("model.init_from: an [adapter] run needs a base checkpoint to train on")
        if self.adapter is not None and self.train.ema_decay > 0:
            raise ValueError("train.ema_decay: must be 0 in an [adapter] run (no weight EMA of adapters)")
        if self.codec.kind == "vae" and not (self.codec.path or self.model.init_from):
            raise ValueError(
                'codec.path: is required when codec.kind = "vae" (unless model.init_from carries the VAE)'
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists, None kept)."""
        return self.model_dump(mode="json")

    def stage_name(self, index: int) -> str:
        return self.stages[index].name or f"stage{index}"

    def resolve_model_config(self) -> XUTConfig | None:
        """The architecture for training from scratch; None when `init_from` decides it."""
        m = self.model
        if m.init_from:
            return None
        if m.preset:
            base = PRESETS[m.preset]
            return base.replace(**m.overrides) if m.overrides else base
        assert m.arch is not None  # guaranteed by ModelSection's validators
        return XUTConfig.from_dict(m.arch)


def error_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's ('stages', 1, 'lr') -> 'stages[1].lr'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _error_text(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        path = error_path(err["loc"])
        lines.append(f"{path}: {msg}" if path else msg)
    return "; ".join(lines)


PATH_FIELDS = {"model": "init_from", "text_encoder": "path", "codec": "path", "data": "path", "cache": "dir"}


def _resolve(path: str | None, base: Path) -> str | None:
    if not path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p))


def config_from_dict(
    data: dict[str, Any], *, base_dir: str | Path | None = None, source: str = ""
) -> TrainConfig:
    """Build and validate a TrainConfig from parsed TOML (or an equivalent dict)."""
    data = dict(data)
    data.setdefault("source", source)
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise TrainConfigError(_error_text(exc)) from None
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    update = {}
    for name, key in PATH_FIELDS.items():  # relative paths: against base_dir
        section = getattr(cfg, name)
        update[name] = section.model_copy(update={key: _resolve(getattr(section, key), base)})
    return cfg.model_copy(update=update)


def load_config(path: str | Path, *, base_dir: str | Path | None = None) -> TrainConfig:
    """Parse a TOML training config file (relative paths inside resolve against `base_dir`, default cwd)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise TrainConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrainConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, base_dir=base_dir, source=str(path))


def dump_toml(cfg: TrainConfig | dict[str, Any]) -> str:
    """The config as TOML that `load_config` reads back to an equal config (unset optional fields are omitted)."""
    data = cfg.model_dump(mode="json", exclude_none=True) if isinstance(cfg, TrainConfig) else cfg
    return tomli_w.dumps(_drop_none(data))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value]
    return value


def write_config(cfg: TrainConfig | dict[str, Any], path: str | Path) -> Path:
    """Write `dump_toml(cfg)` to `path` (the worker writes the trainer's config with this)."""
    path = Path(path)
    path.write_text(dump_toml(cfg), encoding="utf-8")
    return path

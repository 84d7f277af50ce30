"""The TOML training config, parsed once into frozen dataclasses and validated at the boundary.

Every error is a `TrainConfigError` (a ValueError) naming the offending field, e.g. ``stages[1].batch_size``.
Relative paths are resolved against `base_dir` (the current directory unless given). See docs/training.md and
configs/demo-pixel.toml for a complete example.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from hdm_core.captions import CaptionConfig
from hdm_core.config import PRESETS, XUTConfig

Precision = Literal["fp32", "bf16", "fp16"]
LrScaling = Literal["fan_in", "none"]
ScheduleKind = Literal["cosine", "constant"]
DeviceName = Literal["auto", "cpu", "cuda"]


class TrainConfigError(ValueError):
    """The training config is invalid; the message names the field."""


@dataclass(frozen=True)
class ModelSection:
    """Exactly one of `preset`, `arch` (a full XUTConfig dict) or `init_from` (fine-tune a checkpoint).

    `overrides` (a partial XUTConfig dict) is applied on top of a preset.
    """

    preset: str | None = None
    arch: dict[str, Any] | None = None
    overrides: dict[str, Any] | None = None
    init_from: str | None = None
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class TextEncoderSection:
    path: str = ""
    max_length: int = 256  # spec §4: training pads (and truncates) every caption to max_length
    # Build a tiny random Qwen3 + word tokenizer at `path` if it does not exist (demos and tests only).
    build_toy: bool = False
    toy_hidden_size: int = 64
    toy_layers: int = 2


@dataclass(frozen=True)
class CodecSection:
    kind: Literal["pixel", "vae"] = "pixel"
    path: str | None = None  # diffusers AutoencoderKL folder; for kind = "vae" without it, init_from's VAE


@dataclass(frozen=True)
class SyntheticSection:
    """Generate the synthetic shapes set into data.path if that folder does not exist yet."""

    count: int = 1000
    size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class DataSection:
    path: str = ""
    num_workers: int = 2
    shuffle: bool = True
    max_image_pixels: int = 64 * 1024 * 1024
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    synthetic: SyntheticSection | None = None


@dataclass(frozen=True)
class OptimizerSection:
    """AdamW on every parameter with weight decay; with `lr_scaling = "fan_in"` each parameter's lr is
    lr / fan_in (spec §6 "muP" lr: 1-D -> numel, 2-D -> in_features, conv -> in_ch*k*k, RoPE freqs -> h*2)."""

    lr_scaling: LrScaling = "fan_in"
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.02
    eps: float = 1e-8


@dataclass(frozen=True)
class ScheduleSection:
    """Per stage: linear warmup over warmup_steps, then cosine down to min_lr_ratio * lr at the stage's end."""

    kind: ScheduleKind = "cosine"
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.01


@dataclass(frozen=True)
class ObjectiveSection:
    """Flow-matching time sampling: t = sigmoid(N(t_logit_mean, t_logit_std)) (spec §6; SD3's logit-normal).

    The reference trains with (0, 1). A positive mean spends more steps at high noise, where composition is decided;
    small images of flat shapes (the CPU demo) need it, as large images do in SD3's resolution shift.
    """

    t_logit_mean: float = 0.0
    t_logit_std: float = 1.0


@dataclass(frozen=True)
class SamplingSection:
    every: int = 0  # optimizer steps between preview grids; 0 = never
    prompts: tuple[str, ...] = ()
    steps: int = 16
    guidance_scale: float = 3.0
    seed: int = 0


@dataclass(frozen=True)
class TrainSection:
    precision: Precision = "fp32"
    device: DeviceName = "auto"
    grad_clip: float = 1.0  # 0 = no clipping
    ema_decay: float = 0.0  # 0 = no weight EMA (the reference has none)
    log_every: int = 1
    checkpoint_every: int = 500
    keep_last_n: int = 3
    tensorboard: bool = False
    matmul_precision: Literal["highest", "high", "medium"] = "high"
    num_threads: int = 0  # torch intra-op threads per process; 0 = torch's default


@dataclass(frozen=True)
class StageSection:
    """One progressive-resolution stage; unset optional fields inherit the global sections."""

    resolution: int
    batch_size: int  # per rank, per micro-step
    lr: float
    steps: int | None = None
    epochs: float | None = None
    name: str | None = None
    grad_accum: int = 1
    tread_rate: float = 0.5
    caption_dropout: float | None = None
    warmup_steps: int | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    text_encoder: TextEncoderSection
    data: DataSection
    stages: tuple[StageSection, ...]
    codec: CodecSection = field(default_factory=CodecSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    train: TrainSection = field(default_factory=TrainSection)
    seed: int = 20090220  # the reference's seed_everything value (spec §6)
    source: str = ""  # where the config came from (informational)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
        assert m.arch is not None
        return XUTConfig.from_dict(m.arch)


# --- generic validation -------------------------------------------------------------------------------------------


def _fail(path: str, message: str) -> typing.NoReturn:
    raise TrainConfigError(f"{path}: {message}")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except TrainConfigError as exc:
                errors.append(str(exc))
        _fail(path, f"invalid value {value!r} ({'; '.join(e.split(': ', 1)[-1] for e in errors)})")
    if origin is Literal:
        if value not in get_args(tp):
            _fail(path, f"must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            _fail(path, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"must be a string, got {value!r}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            _fail(path, f"must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(path, f"must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, f"must be a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in this module, not in the config


def _build(cls: Any, data: Any, path: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        _fail(path, f"must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        _fail(path, f"unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(sub, "is required")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # the dataclass's own checks (e.g. CaptionConfig) already name the field
        _fail(path or cls.__name__, str(exc))


def _check(cond: bool, path: str, message: str) -> None:
    if not cond:
        _fail(path, message)


def _resolve(path: str | None, base: Path) -> str | None:
    if not path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _validate(cfg: TrainConfig) -> None:
    m = cfg.model
    chosen = [k for k in ("preset", "arch", "init_from") if getattr(m, k)]
    _check(len(chosen) == 1, "model", f"set exactly one of preset, arch, init_from (got {chosen or 'none'})")
    if m.preset:
        _check(m.preset in PRESETS, "model.preset", f"unknown preset {m.preset!r}; known: {sorted(PRESETS)}")
    _check(
        m.overrides is None or bool(m.preset), "model.overrides", "only allowed together with model.preset"
    )
    try:
        cfg.resolve_model_config()
    except (ValueError, TypeError) as exc:
        _fail("model.arch" if m.arch else "model.overrides", str(exc))
    _check(bool(cfg.text_encoder.path), "text_encoder.path", "is required (a local folder)")
    _check(cfg.text_encoder.max_length >= 1, "text_encoder.max_length", "must be >= 1")
    if cfg.codec.kind == "vae":
        _check(
            bool(cfg.codec.path or m.init_from),
            "codec.path",
            'is required when codec.kind = "vae" (unless model.init_from carries the VAE)',
        )
    _check(bool(cfg.data.path), "data.path", "is required")
    _check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(cfg.data.max_image_pixels >= 1, "data.max_image_pixels", "must be >= 1")
    opt = cfg.optimizer
    _check(all(0.0 <= b < 1.0 for b in opt.betas), "optimizer.betas", "each must be in [0, 1)")
    _check(opt.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(opt.eps > 0, "optimizer.eps", "must be > 0")
    _check(-4.0 <= cfg.objective.t_logit_mean <= 4.0, "objective.t_logit_mean", "must be in [-4, 4]")
    _check(0.0 < cfg.objective.t_logit_std <= 4.0, "objective.t_logit_std", "must be in (0, 4]")
    _check(cfg.schedule.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
    _check(0.0 <= cfg.schedule.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]")
    t = cfg.train
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1) (0 = off)")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _check(t.keep_last_n >= 1, "train.keep_last_n", "must be >= 1")
    _check(t.num_threads >= 0, "train.num_threads", "must be >= 0 (0 = torch's default)")
    s = cfg.sampling
    _check(s.every >= 0, "sampling.every", "must be >= 0")
    _check(s.steps >= 1, "sampling.steps", "must be >= 1")
    _check(s.every == 0 or bool(s.prompts), "sampling.prompts", "needed when sampling.every > 0")
    _check(len(cfg.stages) >= 1, "stages", "at least one [[stages]] table is required")
    for i, st in enumerate(cfg.stages):
        p = f"stages[{i}]"
        _check((st.steps is None) != (st.epochs is None), p, "set exactly one of steps, epochs")
        _check(st.steps is None or st.steps >= 1, f"{p}.steps", "must be >= 1")
        _check(st.epochs is None or st.epochs > 0, f"{p}.epochs", "must be > 0")
        _check(st.resolution >= 8, f"{p}.resolution", "must be >= 8")
        _check(st.batch_size >= 1, f"{p}.batch_size", "must be >= 1")
        _check(st.grad_accum >= 1, f"{p}.grad_accum", "must be >= 1")
        _check(st.lr > 0, f"{p}.lr", "must be > 0")
        _check(0.0 <= st.tread_rate < 1.0, f"{p}.tread_rate", "must be in [0, 1)")
        _check(
            st.caption_dropout is None or 0 <= st.caption_dropout <= 1,
            f"{p}.caption_dropout",
            "must be in [0, 1]",
        )
        _check(st.warmup_steps is None or st.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        _check(st.betas is None or all(0 <= b < 1 for b in st.betas), f"{p}.betas", "each must be in [0, 1)")
        _check(st.weight_decay is None or st.weight_decay >= 0, f"{p}.weight_decay", "must be >= 0")
        _check(st.grad_clip is None or st.grad_clip >= 0, f"{p}.grad_clip", "must be >= 0")


def config_from_dict(
    data: dict[str, Any], *, base_dir: str | Path | None = None, source: str = ""
) -> TrainConfig:
    """Build and validate a TrainConfig from parsed TOML (or an equivalent dict)."""
    data = dict(data)
    data.setdefault("source", source)
    if "stages" in data and isinstance(data["stages"], list):
        data["stages"] = tuple(data["stages"])
    cfg = _build(TrainConfig, data, "")
    _validate(cfg)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    data_section = cfg.data
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, init_from=_resolve(cfg.model.init_from, base)),
        text_encoder=dataclasses.replace(cfg.text_encoder, path=_resolve(cfg.text_encoder.path, base) or ""),
        codec=dataclasses.replace(cfg.codec, path=_resolve(cfg.codec.path, base)),
        data=dataclasses.replace(data_section, path=_resolve(data_section.path, base) or ""),
    )


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

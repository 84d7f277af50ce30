"""XUT architecture config, the preset registry (spec §1.1) and the sampling constants the API validates with.

No torch: the API imports this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

SkipSource = Literal["last", "mirrored"]
SamplerName = Literal["euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "euler_a"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)  # hdm_core.sampler.SAMPLERS maps each to its stepper
ScheduleName = Literal["uniform", "karras", "sd3", "tuned"]
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)  # hdm_core.samplers.schedules


@dataclass(frozen=True)
class SamplerInfo:
    """What the API and the parameters text know of a sampler (no torch): its A1111 name, the schedule it uses when
    a request names none (its best on `python -m bench.samplers`), model evaluations per step."""

    a1111: str
    default_schedule: ScheduleName = "uniform"
    evaluations_per_step: int = 1

    def evaluations(self, steps: int) -> int:
        """Velocity evaluations per image (each one or two network passes with CFG); Heun's last step is Euler."""
        return steps if self.evaluations_per_step == 1 else self.evaluations_per_step * steps - 1


SAMPLER_INFO: dict[str, SamplerInfo] = {
    "euler": SamplerInfo("Euler"),
    "heun": SamplerInfo("Heun", evaluations_per_step=2),
    "dpmpp_2m": SamplerInfo("DPM++ 2M", default_schedule="tuned"),
    "dpmpp_3m": SamplerInfo("DPM++ 3M"),
    "dpmpp_2m_sde": SamplerInfo("DPM++ 2M SDE"),
    "unipc": SamplerInfo("UniPC", default_schedule="tuned"),
    "euler_a": SamplerInfo("Euler a"),
}
# The service's and console's defaults, chosen on `python -m bench.samplers` (docs/service.md "Samplers").
DEFAULT_SAMPLER: SamplerName = "unipc"
DEFAULT_STEPS = 16
# Largest image seed: torch.Generator takes 64-bit seeds; image i of a request uses seed + i.
MAX_SEED = 2**63 - 1


def max_seed(images: int) -> int:
    """The largest first seed of a request of ``images`` images (image i uses seed + i, each at most MAX_SEED)."""
    return MAX_SEED - images + 1


def check_seed(seed: int, images: int) -> None:
    """The one seed rule: the API's request schema and the pipeline's ImageJob both call it, so every seed the API
    accepts samples (ValueError names the range)."""
    if not 0 <= seed <= max_seed(images):
        raise ValueError(
            f"seed must be in [0, {max_seed(images)}] for {images} image(s) (seed + i each <= 2^63 - 1), got {seed}"
        )


@dataclass(frozen=True)
class XUTConfig:
    """Architecture of one XUT network. Field names are ours; `from_reference_arch` maps the reference's."""

    patch_size: int = 2
    in_channels: int = 4
    dim: int = 1024
    ctx_dim: int = 1024
    ctx_size: int = 256  # length of the all-zero context used when no text is given
    heads: int = 16
    head_dim: int = 64
    mlp_dim: int = 3072
    depth: int = 4
    enc_blocks: int = 1
    dec_blocks: int = 3
    tread_pre: int = 1
    tread_post: int = 3
    tread_rate: float = 0.5  # fraction of image tokens dropped in training (spec §3)
    addon_dim: int = 1  # 1 = the ln(W/H) aspect-ratio condition, 0 = none
    skip_source: SkipSource = "last"

    def __post_init__(self) -> None:
        positive = (
            "patch_size",
            "in_channels",
            "dim",
            "ctx_dim",
            "heads",
            "head_dim",
            "mlp_dim",
            "depth",
            "enc_blocks",
            "dec_blocks",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"XUTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("ctx_size", "tread_pre", "tread_post", "addon_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"XUTConfig.{name} must be a non-negative integer, got {value!r}")
        if self.heads * self.head_dim != self.dim:
            raise ValueError(
                f"XUTConfig: heads * head_dim ({self.heads} * {self.head_dim}) must equal dim ({self.dim})"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"XUTConfig.head_dim must be a multiple of 4 for 2-D axial RoPE, got {self.head_dim}"
            )
        if not 0.0 <= float(self.tread_rate) < 1.0:
            raise ValueError(f"XUTConfig.tread_rate must be in [0, 1), got {self.tread_rate!r}")
        if self.skip_source not in get_args(SkipSource):
            raise ValueError(
                f"XUTConfig.skip_source must be one of {get_args(SkipSource)}, got {self.skip_source!r}"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XUTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"XUTConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> XUTConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_reference_arch(cls, arch: dict[str, Any]) -> XUTConfig:
        """Map the reference implementation's argument names (e.g. `xut-tiny.json`'s `arch`) to a config."""
        tread = arch.get("tread_config") or {}
        return cls(
            patch_size=arch["patch_size"],
            in_channels=arch["input_dim"],
            dim=arch["dim"],
            ctx_dim=arch["ctx_dim"],
            ctx_size=arch.get("ctx_size", 256),
            heads=arch["heads"],
            head_dim=arch["dim_head"],
            mlp_dim=arch["mlp_dim"],
            depth=arch["depth"],
            enc_blocks=arch["enc_blocks"],
            dec_blocks=arch["dec_blocks"],
            tread_pre=tread.get("prev_trns_depth", 0),
            tread_post=tread.get("post_trns_depth", 0),
            tread_rate=tread.get("dropout_ratio", 0.5),
            addon_dim=arch.get("addon_info_embs_dim", 0) or 0,
        )


# XUTConfig fields that decide the shapes and meaning of the weights an adapter changes: an adapter applies to a
# model only when these agree (hdm_core.adapters.network.check_base; the API checks the same without torch).
ADAPTER_ARCH_FIELDS: tuple[str, ...] = (
    "patch_size",
    "in_channels",
    "dim",
    "ctx_dim",
    "heads",
    "head_dim",
    "mlp_dim",
    "depth",
    "enc_blocks",
    "dec_blocks",
    "tread_pre",
    "tread_post",
    "addon_dim",
)


def adapter_arch_diffs(adapter_base: XUTConfig, model: XUTConfig) -> list[str]:
    """The adapter-relevant fields where an adapter's base architecture and a model's differ, as readable text."""
    return [
        f"{f} {getattr(adapter_base, f)} (adapter) vs {getattr(model, f)} (model)"
        for f in ADAPTER_ARCH_FIELDS
        if getattr(adapter_base, f) != getattr(model, f)
    ]


PRESETS: dict[str, XUTConfig] = {
    # Released HDM weights (`config/arch/xut-small-1024-tread.json`, which is the base model).
    "xut-base": XUTConfig(),
    # Report-only sizes (spec §1.1).
    "xut-small": XUTConfig(dim=896, heads=14, head_dim=64, mlp_dim=3072, ctx_dim=640, dec_blocks=2),
    "xut-large": XUTConfig(dim=1280, heads=10, head_dim=128, mlp_dim=4096, ctx_dim=1152, dec_blocks=3),
    # CPU-sized networks for tests, benchmarks and the demo.
    "xut-debug": XUTConfig(
        dim=64,
        heads=4,
        head_dim=16,
        mlp_dim=160,
        ctx_dim=64,
        ctx_size=16,
        depth=2,
        enc_blocks=1,
        dec_blocks=2,
        tread_pre=1,
        tread_post=1,
    ),
    "xut-pixel-debug": XUTConfig(
        in_channels=3,
        patch_size=2,
        dim=128,
        heads=4,
        head_dim=32,
        mlp_dim=320,
        ctx_dim=64,
        ctx_size=16,
        depth=2,
        enc_blocks=1,
        dec_blocks=2,
        tread_pre=1,
        tread_post=1,
    ),
}


def resolve_preset(name: str) -> XUTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None


def is_pixel_space(arch: str | dict[str, Any] | None) -> bool:
    """A preset name or an architecture dict whose network reads RGB pixels (in_channels 3), so it needs no VAE."""
    if isinstance(arch, dict):
        return arch.get("in_channels") == 3
    return arch in PRESETS and PRESETS[arch].in_channels == 3


def param_count(cfg: XUTConfig) -> int:
    """Parameters of ``XUT(cfg)`` from the config alone (no torch: the API bounds architecture objects with it;
    tests compare it with the built model)."""
    d, p, c = cfg.dim, cfg.patch_size, cfg.in_channels
    rope = cfg.heads * (cfg.head_dim // 4) * 2
    attn = 3 * d * d + d * d + d + rope  # qkv (no bias), out, AxialRoPE freqs
    xattn = d + d * d + 2 * d * d + d * d + d + rope  # pre-norm, q, kv (no bias), out, freqs
    block = d + attn + d + d * 2 * cfg.mlp_dim + 2 * cfg.mlp_dim + cfg.mlp_dim * d + d  # norms, SwiGLU
    blocks = cfg.tread_pre + cfg.tread_post + cfg.depth * (cfg.enc_blocks + cfg.dec_blocks)
    adaln = 2 * d + (d * 4 * d + 4 * d) + (4 * d * 3 * d + 3 * d)
    total = c * d * p * p + d  # patch embedding (conv)
    total += 2 * (d // 2) * d + d  # timestep embedding
    total += 3 * adaln + cfg.ctx_dim * d + d  # shared adaLN x3, ctx projection
    total += (cfg.addon_dim * d + d + d * d + d) if cfg.addon_dim else 0
    total += blocks * block + cfg.depth * xattn  # each decoder stage's first block cross-attends
    return total + d * p * p * c + p * p * c  # unpatch head

"""Adapters on XUT: LyCORIS LoKr / LoRA / LoHa chosen and attached for training (`apply` puts files' deltas into
a model for inference).

Library: `lycoris-lora`, not `peft`. HDM's own fine-tuning recipe is LyCORIS LoKr (factor 4, full matrix, norms
trained; spec §6 "finetune"), so adapters trained here load in the same tooling people use with the released model
(same key layout: `lycoris_<module path>.<lokr_w1|lokr_w2|w_norm|...>`). peft has LoKr/LoHa too, but its LoKr has
no full-matrix switch and no norm training, and it writes another key layout (`base_model.model.<path>...`).
All adapter maths (module factorisations, their forward pass, the weight deltas) come from the library; this file
only chooses the layers, loads files into the library's modules and puts the deltas into (and back out of) the base
weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from lycoris import LycorisNetwork, create_lycoris
from lycoris.modules import NormModule
from torch import Tensor, nn

from ..config import ADAPTER_ARCH_FIELDS, XUTConfig, adapter_arch_diffs
from ..model import XUT
from .errors import AdapterError

Algorithm = Literal["lokr", "lora", "loha"]

# fnmatch patterns over `XUT.named_modules()` names: every Linear of the attention, cross-attention and SwiGLU of
# the transformer blocks (prev_tread_trns, backbone, post_tread_trns), as HDM's recipe. The shared adaLN MLPs,
# embeddings and the output head stay frozen.
DEFAULT_TARGETS: tuple[str, ...] = ("*.attn.qkv", "*.attn.out", "*.xattn.*", "*.mlp.*")
# The blocks' RMSNorms (inside ModulatedNorm), added to the targets when `train_norm` is set.
NORM_TARGETS: tuple[str, ...] = ("*_pre_norm.norm",)
ARCH_FIELDS = ADAPTER_ARCH_FIELDS  # the one list, in hdm_core.config (torch-free)


@dataclass(frozen=True)
class AdapterConfig:
    """What to train. Defaults = HDM's recipe: LoKr, factor 4, full matrix (w2 not low-rank), norms trained.

    `rank`/`alpha` are the low-rank size and scale of LoRA/LoHa (scale alpha/rank); full-matrix LoKr has no rank
    (the library fixes its scale at 1). `factor` and `full_matrix` are LoKr-only. `targets` are fnmatch patterns
    over the model's module names (e.g. "backbone.dec_blocks.*.mlp.w3"); only Linear layers among them get an
    adapter.
    """

    algorithm: Algorithm = "lokr"
    rank: int = 8
    alpha: float = 4.0
    factor: int = 4
    full_matrix: bool = True
    train_norm: bool = True
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.algorithm not in get_args(Algorithm):
            raise ValueError(
                f"AdapterConfig.algorithm must be one of {get_args(Algorithm)}, got {self.algorithm!r}"
            )
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"AdapterConfig.rank must be a positive integer, got {self.rank!r}")
        alpha = self.alpha
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"AdapterConfig.alpha must be a finite number > 0, got {alpha!r}")
        factor = self.factor
        if not isinstance(factor, int) or isinstance(factor, bool) or not (factor == -1 or factor >= 2):
            raise ValueError(f"AdapterConfig.factor must be -1 (balanced) or an integer >= 2, got {factor!r}")
        for name in ("full_matrix", "train_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AdapterConfig.{name} must be true or false, got {getattr(self, name)!r}")
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, Sequence):
            raise ValueError(f"AdapterConfig.targets must be a list of module-name patterns, got {targets!r}")
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"AdapterConfig.targets must be non-empty strings, got {list(targets)!r}")
        object.__setattr__(self, "targets", tuple(targets))
        object.__setattr__(self, "alpha", float(alpha))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AdapterConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def lycoris_kwargs(self) -> dict[str, Any]:
        return {
            "linear_dim": self.rank,
            "linear_alpha": self.alpha,
            "algo": self.algorithm,
            "factor": self.factor,
            "full_matrix": self.full_matrix and self.algorithm == "lokr",
            "train_norm": self.train_norm,
        }


# LycorisNetwork keeps its target preset in class attributes. Set ours for one construction and put the previous
# values back, so two models in one process (a trainer and a worker, two adapters) never see each other's targets.
_PRESET_ATTRS = (
    "ENABLE_CONV",
    "TARGET_REPLACE_MODULE",
    "TARGET_REPLACE_NAME",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "LORA_PREFIX",
    "USE_FNMATCH",
    "TARGET_EXCLUDE_NAME",
)
_LYCORIS_LOCK = threading.Lock()


@contextmanager
def lend_norms(model: nn.Module) -> Iterator[None]:
    """The library trains a norm it does not know (neither LayerNorm nor GroupNorm) when the module exposes its
    weight-free normalisation as `_norm` (the LLaMA RMSNorm convention); torch's RMSNorm does not, so lend it
    one while the library's modules are built (NormModule keeps a reference) and take it away afterwards."""
    lent = []
    for module in model.modules():
        if isinstance(module, nn.RMSNorm) and not hasattr(module, "_norm"):
            module._norm = functools.partial(
                F.rms_norm, normalized_shape=module.normalized_shape, eps=module.eps
            )
            lent.append(module)
    try:
        yield
    finally:
        for module in lent:
            del module._norm


@contextmanager
def _lycoris_targets(model: nn.Module, names: tuple[str, ...]) -> Iterator[None]:
    with _LYCORIS_LOCK, lend_norms(model):
        saved = {attr: getattr(LycorisNetwork, attr) for attr in _PRESET_ATTRS}
        LycorisNetwork.apply_preset(
            {
                "enable_conv": False,
                "target_module": [],
                "target_name": list(names),
                "module_algo_map": {},
                "name_algo_map": {},
                "lora_prefix": "lycoris",
                "use_fnmatch": True,
                "exclude_name": [],
            }
        )
        try:
            yield
        finally:
            for attr, value in saved.items():
                setattr(LycorisNetwork, attr, value)


def build_network(model: XUT, cfg: AdapterConfig) -> LycorisNetwork:
    """The library's network for `cfg` over `model`, not yet hooked in (`apply_to`)."""
    names = cfg.targets + (NORM_TARGETS if cfg.train_norm else ())
    with _lycoris_targets(model, names):
        network = create_lycoris(model, 1.0, warn_on_unmatched=False, **cfg.lycoris_kwargs())
    network.loras = [m for m in network.loras if not m.not_supported]
    for module in network.loras:
        if isinstance(module, NormModule) and "b_norm" not in module._parameters:
            # lycoris 4.1 NormModule.get_diff_weight reads `b_norm` unconditionally; RMSNorm has no bias.
            module.b_norm = None
    if not any(not isinstance(m, NormModule) for m in network.loras):
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise AdapterError(
            f"adapter targets {list(cfg.targets)} match no Linear layer of this XUT (e.g. {linear[:3]})"
        )
    return network


@dataclass(eq=False)
class AdapterNetwork:
    """An adapter hooked into a model for training: the library's network plus what it was built from."""

    network: LycorisNetwork
    config: AdapterConfig
    base: XUTConfig

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.network.parameters()

    def state_dict(self) -> dict[str, Tensor]:
        """Keys in the library's layout, e.g. `lycoris_backbone_enc_blocks_0_0_attn_qkv.lokr_w1`."""
        return self.network.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.network.load_state_dict(state, strict=True)

    def detach(self) -> None:
        """Unhook the adapter; the model computes exactly what it did before `attach`."""
        self.network.restore()


def attach(model: XUT, cfg: AdapterConfig) -> AdapterNetwork:
    """Freeze `model`, hook a fresh adapter into it (the library's forward wrappers) and return it for the
    optimizer. Adapter parameters are fp32 on the model's device; the model's own weights are not changed."""
    network = build_network(model, cfg)
    model.requires_grad_(False)
    network.apply_to()
    network.to(next(model.parameters()).device)
    network.requires_grad_(True)
    return AdapterNetwork(network=network, config=cfg, base=model.config)


def adapter_parameter_count(config: XUTConfig, cfg: AdapterConfig) -> int:
    """Parameters of an adapter for an XUT of `config`, built on the meta device (no memory)."""
    with torch.device("meta"):
        network = build_network(XUT(config), cfg)
    return sum(p.numel() for module in network.loras for p in module.parameters())


def check_base(adapter_base: XUTConfig, model_config: XUTConfig, *, name: str = "adapter") -> None:
    """Refuse an adapter trained on an XUT of another shape, naming the fields that differ."""
    diffs = adapter_arch_diffs(adapter_base, model_config)
    if diffs:
        raise AdapterError(f"{name} was trained for a different XUT architecture: {'; '.join(diffs)}")

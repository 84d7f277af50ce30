"""Adapters applied to a model for inference: the deltas of loaded adapter files (`files.LoadedAdapter`) added to
the base weights in place and removed exactly, or merged into a copy of the model."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from lycoris.modules import FullModule, LohaModule, LokrModule, NormModule, get_module, make_module
from torch import Tensor, nn

from ..model import XUT
from .files import LoadedAdapter
from .keys import stem
from .network import AdapterError, build_network, check_base, lend_norms


def _delta(module: nn.Module, weight: float) -> tuple[Tensor, Tensor | None]:
    """(ΔW, Δbias) that the library's forward adds to its layer at multiplier `weight`."""
    if isinstance(module, LokrModule | LohaModule):
        # lycoris 4.1.3's get_diff_weight scales these by alpha/rank twice while their forward (what was trained)
        # scales once (tests/core/test_adapter.py checks against the forward); rebuild ΔW as the forward does.
        return module.get_weight(module.shape) * module.scalar * weight, None
    if isinstance(module, NormModule):
        return module.get_diff_weight(weight)
    if isinstance(module, FullModule):  # `diff` / `diff_b` are the deltas themselves
        return module.weight * weight, None if module.bias is None else module.bias * weight
    return module.get_diff_weight(weight, shape=module.shape)


def _adapter_modules(model: XUT, adapter: LoadedAdapter) -> nn.Module:
    """The adapter's library modules over `model`, each made by the library from its tensors
    (`make_module_from_state_dict`: the algorithm from the param names, factor and rank from the shapes), checked to
    hold exactly the file's tensors (not hooked in)."""
    check_base(adapter.base, model.config, name=f"adapter {adapter.name!r}")
    if adapter.config is not None:  # trained here: the file holds exactly what its config builds
        _check_keys(adapter, {k for m in build_network(model, adapter.config).loras for k in _keys(m)})
    layers = {stem(n): m for n, m in model.named_modules() if n}
    stems = sorted({k.split(".", 1)[0] for k in adapter.tensors})
    unknown = [s for s in stems if s not in layers]
    if unknown:
        raise AdapterError(f"adapter {adapter.name!r} does not fit this model: no layer for {unknown[:5]}")
    holder = nn.Module()
    with lend_norms(model):
        for s in stems:
            kind, params = get_module(adapter.tensors, s)
            try:
                module = make_module(kind, params, s, layers[s]) if kind is not None else None
            except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
                raise AdapterError(f"adapter {adapter.name!r}: {s} does not fit this model: {exc}") from exc
            if module is None or module.not_supported:
                raise AdapterError(f"adapter {adapter.name!r}: {s} is no LyCORIS module this service applies")
            if isinstance(module, NormModule) and "b_norm" not in module._parameters:
                module.b_norm = (
                    None  # lycoris 4.1 NormModule reads `b_norm` unconditionally; RMSNorm has no bias
                )
            holder.add_module(s, module)
    _check_keys(adapter, set(holder.state_dict()))
    return holder.eval()


def _keys(module: nn.Module) -> list[str]:
    return [f"{module.lora_name}.{k}" for k in module.state_dict()]


def _check_keys(adapter: LoadedAdapter, expected: set[str]) -> None:
    found = set(adapter.tensors)
    if expected != found:
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise AdapterError(
            f"adapter {adapter.name!r} does not fit this model: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )


@dataclass(eq=False)
class AppliedAdapters:
    """Adapters merged into a model's weights; `restore()` puts the original bits back."""

    model: XUT
    originals: dict[str, Tensor]
    adapters: tuple[tuple[str, float], ...]

    def restore(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self.originals.items():
                params[name].copy_(original)
        self.originals = {}

    def __enter__(self) -> AppliedAdapters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


@torch.no_grad()
def apply_adapters(model: XUT, adapters: Sequence[tuple[LoadedAdapter, float]]) -> AppliedAdapters:
    """Add sum_i weight_i * ΔW_i to the touched weights of `model` in place (weights may be negative; weight 0
    skips the adapter). Every delta is computed before any weight changes, so a bad adapter leaves the model as it
    was. Keep the returned handle and call `restore()` (or use it as a context manager) before the next request."""
    for i, (_, weight) in enumerate(adapters):
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise AdapterError(f"adapters[{i}].weight must be a finite number, got {weight!r}")
    names = {id(m): n for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    deltas: dict[str, Tensor] = {}
    for adapter, weight in adapters:
        if weight == 0:
            continue
        for module in _adapter_modules(model, adapter).children():
            layer = module.org_module[0]
            dw, db = _delta(module, float(weight))
            for suffix, d in (("weight", dw), ("bias", db)):
                if d is None:
                    continue
                key = f"{names[id(layer)]}.{suffix}"
                d = d.detach().to(params[key].device, torch.float32).reshape(params[key].shape)
                deltas[key] = deltas[key] + d if key in deltas else d
    originals = {}
    for key, d in deltas.items():
        p = params[key]
        originals[key] = p.detach().clone()
        p.copy_((p.float() + d).to(p.dtype))
    return AppliedAdapters(model, originals, tuple((a.name, float(w)) for a, w in adapters))


def merge_adapters(model: XUT, adapters: Sequence[tuple[LoadedAdapter, float]]) -> XUT:
    """A copy of `model` with the adapters merged in, for `hdm_core.checkpoint.save_checkpoint`; `model` is not
    changed."""
    merged = copy.deepcopy(model)
    apply_adapters(merged, adapters)
    return merged

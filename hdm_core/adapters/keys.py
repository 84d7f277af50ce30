"""Adapter files made elsewhere, by name and shape only (no torch: the API reads safetensors headers).

Three key layouts are read and mapped onto the LyCORIS layout over XUT module paths (`lycoris_<path with _>.<param>`,
what `files.save_adapter` writes and `apply` loads with the library's own `make_module_from_state_dict`):
- LyCORIS: `lycoris_<path>.<param>`, also `lycoris_model_<path>` when the network was built on a wrapper that holds
  the XUT as `.model` (HDM's trainer); params as the library's modules name them (LoKr, LoHa, LoCon/LoRA, full/diff,
  `w_norm`/`b_norm` on LayerNorms and RMSNorms).
- kohya: `lora_unet_<path>.<lora_down.weight|lora_up.weight|alpha>` (the same params, another prefix).
- peft / diffusers: `[base_model.model.|transformer.|unet.|diffusion_model.|model.]<dotted path>.lora_A.weight`,
  `.lora_B.weight` (+ optional `.alpha`); A is LyCORIS' `lora_down`, B its `lora_up`.
The algorithm of each module comes from its params (as `lycoris.modules.get_module` decides), the rank from the
shapes, and every module's implied weight shape is checked against the base model's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import AdapterError

Layout = Literal["lycoris", "kohya", "peft"]
Shape = tuple[int, ...]

# params of the LyCORIS modules this service applies, by module (lycoris.modules.*.weight_list)
PARAMS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"),
    "lokr": (
        *("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2"),
        "alpha",
        "dora_scale",
    ),
    "full": ("diff", "diff_b"),
    "norm": ("w_norm", "b_norm"),
}
# the param that identifies each module, in the library's detection order (lycoris.modules.MODULE_LIST)
_DETECT = (("lora", "lora_up.weight"), ("loha", "hada_w1_a"), ("lokr", "lokr_w1"), ("lokr", "lokr_w1_a"))
_DETECT += (("full", "diff"), ("norm", "w_norm"))
_ALL_PARAMS = sorted({p for params in PARAMS.values() for p in params}, key=len, reverse=True)
_PEFT = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "alpha": "alpha"}
_PEFT_PREFIXES = ("base_model.model.", "transformer.", "unet.", "diffusion_model.", "model.")
_KOHYA = re.compile(r"^lora_unet_(?P<stem>[A-Za-z0-9_]+)\.(?P<param>.+)$")
_LYCORIS = re.compile(r"^lycoris_(?P<stem>[A-Za-z0-9_]+)\.(?P<param>.+)$")
MAX_NAMED = 5


@dataclass(frozen=True)
class Mapped:
    """A file's keys mapped onto XUT: `rename` old key -> `lycoris_<path>.<param>`; per module its path and
    algorithm; `add_alpha`: modules (new stems) without an `alpha` tensor, which get alpha = rank (scale 1, peft's
    file carries its alpha in a JSON config this service never sees)."""

    layout: Layout
    rename: dict[str, str]
    modules: dict[str, str]  # stem -> XUT module path
    algorithms: dict[str, str]  # stem -> lora | loha | lokr | full | norm
    add_alpha: tuple[str, ...]


def stem(path: str) -> str:
    return "lycoris_" + path.replace(".", "_")


def _split_param(rest: str) -> tuple[str, str] | None:
    for param in _ALL_PARAMS:
        if rest.endswith("." + param):
            return rest[: -len(param) - 1], param
    return None


def _resolve_underscored(raw: str, by_stem: Mapping[str, str]) -> str | None:
    candidate = raw
    while True:
        if "lycoris_" + candidate in by_stem:
            return by_stem["lycoris_" + candidate]
        if not candidate.startswith("model_"):
            return None
        candidate = candidate[len("model_") :]


def _resolve_dotted(raw: str, paths: frozenset[str]) -> str | None:
    candidate = raw
    while candidate not in paths:
        prefix = next((p for p in _PEFT_PREFIXES if candidate.startswith(p)), None)
        if prefix is None:
            return None
        candidate = candidate[len(prefix) :]
    return candidate


def _layout(keys: Sequence[str]) -> Layout:
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "peft"
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    return "lycoris"


def map_keys(keys: Sequence[str], module_paths: Sequence[str]) -> Mapped:
    """Map every tensor key onto an XUT module path, or raise naming the first keys that name no XUT module."""
    paths = frozenset(module_paths)
    by_stem = {stem(p): p for p in paths}
    layout = _layout(keys)
    rename: dict[str, str] = {}
    params: dict[str, set[str]] = {}
    modules: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        path, param = None, None
        if layout == "peft":
            split = next(((key[: -len(s) - 1], s) for s in _PEFT if key.endswith("." + s)), None)
            if split is not None:
                path, param = _resolve_dotted(split[0], paths), _PEFT[split[1]]
        else:
            m = (_KOHYA if layout == "kohya" else _LYCORIS).match(key)
            if m is None and layout == "kohya":
                m = _LYCORIS.match(key)
            split = _split_param(key) if m is not None else None
            if m is not None and split is not None:
                raw = (
                    split[0].split("_", 2)[2] if key.startswith("lora_unet_") else split[0][len("lycoris_") :]
                )
                path, param = _resolve_underscored(raw, by_stem), split[1]
        if path is None or param is None:
            unknown.append(key)
            continue
        s = stem(path)
        modules[s] = path
        params.setdefault(s, set()).add(param)
        rename[key] = f"{s}.{param}"
    if unknown:
        raise AdapterError(
            f"{len(unknown)} tensor(s) name no module of this XUT ({layout} layout), e.g. {unknown[:MAX_NAMED]}"
        )
    if not rename:
        raise AdapterError("the file holds no adapter tensors")
    if len(set(rename.values())) != len(rename):
        dup = [k for k, n in Counter(rename.values()).items() if n > 1]
        raise AdapterError(f"two tensors map onto the same adapter key: {dup[:MAX_NAMED]}")
    algorithms: dict[str, str] = {}
    for s, found in params.items():
        algo = next((a for a, det in _DETECT if det in found), None)
        if algo is None or not found <= set(PARAMS[algo]):
            raise AdapterError(
                f"module {modules[s]!r}: tensors {sorted(found)} are no LyCORIS module this reads"
            )
        algorithms[s] = algo
    add_alpha = tuple(
        s for s, algo in algorithms.items() if algo in ("lora", "loha", "lokr") and "alpha" not in params[s]
    )
    return Mapped(layout, rename, modules, algorithms, add_alpha)


def _product(a: Shape | None, b: Shape | None) -> Shape | None:
    return (a[0], b[1]) if a and b and len(a) == 2 and len(b) == 2 else None


def implied_shape(algo: str, shapes: Mapping[str, Shape]) -> Shape | None:
    """The weight shape a module's tensors (param -> shape) adapt, or None when they are inconsistent."""
    g = shapes.get
    if algo == "lora":
        return _product(g("lora_up.weight"), g("lora_down.weight"))
    if algo == "loha":
        return _product(g("hada_w1_a"), g("hada_w1_b"))
    if algo == "lokr":
        w1, w2 = (
            g("lokr_w1") or _product(g("lokr_w1_a"), g("lokr_w1_b")),
            g("lokr_w2") or _product(g("lokr_w2_a"), g("lokr_w2_b")),
        )
        if not w1 or not w2 or len(w1) != 2 or len(w2) != 2:
            return None
        return (w1[0] * w2[0], w1[1] * w2[1])
    return g("diff") if algo == "full" else g("w_norm")


def rank_of(algo: str, shapes: Mapping[str, Shape]) -> int | None:
    """The low-rank size, None for full-matrix / full / norm modules."""
    key = {"lora": "lora_down.weight", "loha": "hada_w1_b", "lokr": "lokr_w2_a"}.get(algo)
    if algo == "lokr" and key not in shapes:
        key = "lokr_w1_a"
        return shapes[key][1] if key in shapes else None
    return shapes[key][0] if key and key in shapes else None


def check_shapes(
    mapped: Mapped, tensor_shapes: Mapping[str, Shape], base_shapes: Mapping[str, Shape]
) -> dict[str, int | None]:
    """Each module's implied shape against the base weight (`base_shapes`: XUT module path -> weight shape);
    raise naming the first modules that do not fit; return each module's rank."""
    by_stem: dict[str, dict[str, Shape]] = {}
    for old, new in mapped.rename.items():
        s, param = new.split(".", 1)
        by_stem.setdefault(s, {})[param] = tuple(tensor_shapes[old])
    bad: list[str] = []
    ranks: dict[str, int | None] = {}
    for s, shapes in by_stem.items():
        path, algo = mapped.modules[s], mapped.algorithms[s]
        want = base_shapes.get(path)
        got = implied_shape(algo, shapes)
        fits = got is not None and want is not None and math.prod(got) == math.prod(want)
        if fits and algo in ("lora", "loha", "lokr") and len(want or ()) >= 2:
            fits = got == tuple(want[:2]) if want is not None else False
        if not fits:
            bad.append(f"{path} ({algo} for {got}, model has {want})")
        ranks[s] = rank_of(algo, shapes)
    if bad:
        raise AdapterError(
            f"{len(bad)} adapted layer(s) do not fit the base model's shapes: {'; '.join(bad[:MAX_NAMED])}"
        )
    return ranks

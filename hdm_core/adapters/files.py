"""Adapter files: safetensors in the LyCORIS key layout, with the metadata that says what they are for."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lycoris.modules import LoConModule, LohaModule, LokrModule, NormModule
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..checkpoint import atomic_save_file
from ..config import XUTConfig
from .keys import PARAMS
from .network import AdapterConfig, AdapterError, AdapterNetwork

FORMAT = "hdm-serve-adapter/1"
# Tensor names each algorithm may write, as the library declares them (`weight_list`), plus trained norms.
_ALGORITHM_KEYS = {
    "lokr": set(LokrModule.weight_list),
    "lora": set(LoConModule.weight_list),
    "loha": set(LohaModule.weight_list),
}
_NORM_KEYS = set(NormModule.weight_list)
_IMPORTED_KEYS = {p for params in PARAMS.values() for p in params}
_KEY = re.compile(r"^lycoris_[A-Za-z0-9_]+\.(?P<param>.+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter was trained on and for; stored in the file's metadata."""

    base_model: str
    base_sha256: str
    steps: int
    trigger_words: tuple[str, ...] = ()
    caption_sample: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError(f"AdapterInfo.base_model must be a non-empty name, got {self.base_model!r}")
        if not isinstance(self.base_sha256, str) or not _SHA256.match(self.base_sha256):
            raise ValueError(
                f"AdapterInfo.base_sha256 must be 64 lowercase hex digits, got {self.base_sha256!r}"
            )
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"AdapterInfo.steps must be a non-negative integer, got {self.steps!r}")
        words = self.trigger_words
        if isinstance(words, str) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"AdapterInfo.trigger_words must be a list of strings, got {words!r}")
        object.__setattr__(self, "trigger_words", tuple(words))
        if not isinstance(self.caption_sample, str):
            raise ValueError(f"AdapterInfo.caption_sample must be a string, got {self.caption_sample!r}")


@dataclass(frozen=True)
class LoadedAdapter:
    """A validated adapter file: tensors (LyCORIS keys) + what it is; apply with `hdm_core.adapters.apply`."""

    name: str
    tensors: dict[str, Tensor]
    config: (
        AdapterConfig | None
    )  # None for a file made elsewhere (`imports.convert`): its tensors say what it is
    base: XUTConfig
    info: AdapterInfo
    metadata: dict[str, str] = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_adapter(
    network: AdapterNetwork, path: str | Path, info: AdapterInfo, *, dtype: torch.dtype | None = None
) -> Path:
    """Write the adapter's tensors (the library's state-dict layout) and metadata, atomically."""
    path = Path(path)
    tensors = {
        k: (v.detach().to("cpu", dtype) if dtype is not None else v.detach().to("cpu")).contiguous()
        for k, v in network.state_dict().items()
    }
    cfg = network.config
    metadata = {
        "format": FORMAT,
        "hdm_adapter_algorithm": cfg.algorithm,
        "hdm_adapter_config": json.dumps(cfg.to_dict()),
        "hdm_base_model": info.base_model,
        "hdm_base_sha256": info.base_sha256,
        "hdm_base_config": json.dumps(network.base.to_dict()),
        "hdm_trigger_words": json.dumps(list(info.trigger_words)),
        "hdm_caption_sample": info.caption_sample,
        "hdm_training_steps": str(info.steps),
        # The keys LyCORIS's kohya front end writes, so its tools recognise the file.
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_network_args": json.dumps(
            {
                "algo": cfg.algorithm,
                "factor": cfg.factor,
                "full_matrix": cfg.full_matrix,
                "train_norm": cfg.train_norm,
            }
        ),
    }
    atomic_save_file(tensors, path, metadata)
    return path


def _json(meta: dict[str, str], key: str, path: Path) -> object:
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: metadata {key} is not valid JSON: {exc}") from None


def _parse_metadata(meta: dict[str, str], path: Path) -> tuple[AdapterConfig | None, XUTConfig, AdapterInfo]:
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    imported = "hdm_adapter_source" in meta
    required = (
        "hdm_adapter_algorithm",
        "hdm_adapter_config",
        "hdm_base_model",
        "hdm_base_sha256",
        "hdm_base_config",
        "hdm_trigger_words",
        "hdm_caption_sample",
        "hdm_training_steps",
    )
    missing = [k for k in required if k not in meta]
    if missing:
        raise AdapterError(f"{path}: metadata lacks {missing}")
    try:
        raw = _json(meta, "hdm_adapter_config", path)
        config = None if imported else AdapterConfig.from_dict(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: metadata hdm_adapter_config: {exc}") from None
    if config is not None and meta["hdm_adapter_algorithm"] != config.algorithm:
        raise AdapterError(
            f"{path}: metadata hdm_adapter_algorithm {meta['hdm_adapter_algorithm']!r} != "
            f"hdm_adapter_config.algorithm {config.algorithm!r}"
        )
    try:
        base = XUTConfig.from_dict(_json(meta, "hdm_base_config", path))  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: metadata hdm_base_config: {exc}") from None
    steps = meta["hdm_training_steps"]
    if not steps.isdigit():
        raise AdapterError(
            f"{path}: metadata hdm_training_steps must be a non-negative integer, got {steps!r}"
        )
    try:
        info = AdapterInfo(
            base_model=meta["hdm_base_model"],
            base_sha256=meta["hdm_base_sha256"],
            steps=int(steps),
            trigger_words=_json(meta, "hdm_trigger_words", path),  # type: ignore[arg-type]
            caption_sample=meta["hdm_caption_sample"],
        )
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: metadata: {exc}") from None
    return config, base, info


def _check_tensors(tensors: dict[str, Tensor], config: AdapterConfig | None, path: Path) -> None:
    if not tensors:
        raise AdapterError(f"{path} holds no tensors")
    if config is None:
        allowed, what = _IMPORTED_KEYS, "LyCORIS"
    else:
        allowed = _ALGORITHM_KEYS[config.algorithm] | (_NORM_KEYS if config.train_norm else set())
        what = f"LyCORIS {config.algorithm}"
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None or m["param"] not in allowed:
            raise AdapterError(
                f"{path}: tensor {key!r} is not a {what} key "
                f"(expected 'lycoris_<module>.<one of {sorted(allowed)}>')"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterError(f"{path}: tensor {key!r} holds NaN or infinite values")


def load_adapter(path: str | Path, *, name: str | None = None) -> LoadedAdapter:
    """Read and validate an adapter file written by `save_adapter`; `name` defaults to the file's stem. Whether it
    fits a given model is checked when it is applied (`hdm_core.adapters.apply.apply_adapters`)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from None
    config, base, info = _parse_metadata(meta, path)
    _check_tensors(tensors, config, path)
    return LoadedAdapter(
        name=name or path.stem, tensors=tensors, config=config, base=base, info=info, metadata=meta
    )

"""Adapter runs ([adapter] in the config): a LyCORIS adapter hooked into a frozen base, saved as adapter files.

The base XUT (`model.init_from`) is frozen; the library's forward hooks add the adapter, so the flow loss, the
gradient checkpointing and the previews all see base + adapter. Only the adapter's parameters (and the trained
norms) reach the optimizer. Snapshots hold `adapter.safetensors` (`hdm_core.adapters.files.save_adapter`, in
`[adapter] save_dtype`) instead of a model copy, and the fp32 adapter in the training state, so resume is bit-exact
whatever the file's precision; the run's result is `final_adapter.safetensors`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from hdm_core.adapters.files import AdapterInfo, file_sha256, save_adapter
from hdm_core.adapters.network import AdapterConfig, AdapterNetwork, attach
from hdm_core.data.captions import clean_caption
from hdm_core.data.scan import read_caption
from hdm_core.model import XUT
from hdm_core.precision import DTYPES
from hdm_core.train.config import TrainConfig

logger = logging.getLogger(__name__)


class HookedModel(nn.Module):
    """The frozen base with its adapter as one module: what DDP wraps (it syncs the adapter's gradients)."""

    def __init__(self, model: XUT, network: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.network = network

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class AdapterRun:
    """The adapter being trained and what its files say about it."""

    def __init__(self, cfg: TrainConfig, model: XUT, files: list[Path], *, hash_base: bool = True) -> None:
        section, base_path = cfg.adapter, cfg.model.init_from
        assert section is not None and base_path is not None  # TrainConfig's validators
        with torch.random.fork_rng(devices=[]):
            # The library initialises from the global RNG: seed it, so every rank and every rerun of the run (a
            # resume replays the same data onto the same start) begins from the same adapter.
            torch.manual_seed(cfg.seed)
            self.adapter: AdapterNetwork = attach(model, AdapterConfig.from_dict(section.adapter_config()))
        self.module = HookedModel(model, self.adapter.network)
        sample = section.caption_sample
        if sample is None:
            sample = clean_caption(read_caption(files[0]), cfg.data.captions.tag_separator) if files else ""
        self.base_name = section.base_name or Path(base_path).stem
        # Only rank 0 writes files; the other ranks skip hashing a possibly large checkpoint.
        self.base_sha256 = file_sha256(base_path) if hash_base else "0" * 64
        self.trigger_words = section.trigger_words
        self.caption_sample = sample
        self.save_dtype = section.save_dtype
        n = sum(p.numel() for p in self.adapter.parameters())
        logger.info("training a %s adapter (%d parameters) on %s", section.algorithm, n, base_path)

    @property
    def network(self) -> nn.Module:
        return self.adapter.network

    def info(self, step: int) -> AdapterInfo:
        return AdapterInfo(
            base_model=self.base_name,
            base_sha256=self.base_sha256,
            steps=step,
            trigger_words=self.trigger_words,
            caption_sample=self.caption_sample,
        )

    def save(self, path: Path, step: int) -> Path:
        return save_adapter(self.adapter, path, self.info(step), dtype=DTYPES[self.save_dtype])

    def state(self) -> dict[str, torch.Tensor]:
        """The adapter's fp32 weights, for the training state (the file may be half precision)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.adapter.state_dict().items()}

    def load(self, state: dict[str, torch.Tensor] | None, path: Path) -> None:
        """Resume: the training state's fp32 weights, else (a snapshot written before they were kept) the file."""
        self.adapter.load_state_dict(state if state is not None else load_file(path))

    def manifest_entry(self, file: str, step: int) -> dict[str, Any]:
        """What the worker needs to register the snapshot's adapter without opening it."""
        return {
            "kind": "adapter",
            "adapter": {
                "file": file,
                "dtype": self.save_dtype,
                "algorithm": self.adapter.config.algorithm,
                "base_model": self.base_name,
                "base_sha256": self.base_sha256,
                "steps": step,
                "trigger_words": list(self.trigger_words),
                "caption_sample": self.caption_sample,
            },
        }

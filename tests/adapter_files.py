"""Adapter files as other tools write them, for tests/core/test_adapter_import.py and the upload tests: a LyCORIS
network built the way HDM's trainer builds it (the library's defaults on a wrapper that holds the XUT as `.model`),
the same LoRA under kohya and peft names, and a pickle that would run code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from lycoris import LycorisNetwork, create_lycoris
from torch import nn

from hdm_core import XUT

# HDM's fine-tune recipe (spec §6 "finetune": LoKr factor 4, full matrix, norms trained) and two other algorithms
RECIPES = {
    "lokr": {"algo": "lokr", "factor": 4, "full_matrix": True, "train_norm": True, "linear_dim": 100000},
    "loha": {"algo": "loha", "linear_dim": 4, "linear_alpha": 2.0},
    "lora": {"algo": "lora", "linear_dim": 4, "linear_alpha": 1.0},
    "lora-alpha-rank": {"algo": "lora", "linear_dim": 4, "linear_alpha": 4.0},
}


class Trainer(nn.Module):
    """The module tree HDM's trainer builds its LyCORIS network on: the XUT under `.model`."""

    def __init__(self, xut: XUT) -> None:
        super().__init__()
        self.model = xut


def inputs(model: XUT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    return x, torch.tensor([0.3, 0.8]), torch.randn(2, 5, cfg.ctx_dim, generator=g)


def foreign_network(model: XUT, recipe: str, seed: int = 5) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(state dict, output of `model` with the library's hooks applied) of a random network made with the
    library's default targets (every Linear and LayerNorm) on the wrapper; `model` is left as it was."""
    x, t, ctx = inputs(model)
    saved = {a: getattr(LycorisNetwork, a) for a in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME")}
    LycorisNetwork.apply_preset({"target_module": ["Linear", "LayerNorm"], "target_name": []})
    try:
        network = create_lycoris(Trainer(model), 1.0, **RECIPES[recipe])
    finally:
        for a, v in saved.items():
            setattr(LycorisNetwork, a, v)
    network.apply_to()  # the network holds its modules' parameters from here on
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if recipe == "loha" else 0.05))  # LoHa: a product of products
    with torch.no_grad():
        hooked = model(x, t, ctx)
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    network.restore()
    return state, hooked


def kohya_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("lycoris_model_", "lora_unet_", 1): v for k, v in state.items()}


def peft_names(state: dict[str, torch.Tensor], model: XUT) -> dict[str, torch.Tensor]:
    paths = {"lycoris_model_" + n.replace(".", "_"): n for n, _ in model.named_modules() if n}
    rename = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
    out = {}
    for key, value in state.items():
        stem, param = key.split(".", 1)
        out[f"base_model.model.{paths[stem]}.{rename[param]}"] = value
    return out


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(path: Path, marker: Path) -> Path:
    """A `.pt` whose unpickling would create `marker` (a plain pickle.load runs os.system)."""
    with path.open("wb") as fh:
        pickle.dump({"lycoris_model_x.alpha": _RunsCode(marker)}, fh)
    return path

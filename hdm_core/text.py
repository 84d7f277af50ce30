"""Frozen causal-LM text encoder: the final hidden states (after the last norm) of a local folder (spec §4)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Padding = Literal["longest", "max_length"]
MAX_TOKENS = (
    256  # prompts are truncated to this many tokens at inference (spec §4: the training caption length)
)


class TextEncoder:
    """Tokenizer + transformers `AutoModel` from a local folder (Qwen3-0.6B in production).

    No BOS/EOS, no chat template; right padding with the tokenizer's pad token. The attention mask goes to the LM,
    but pad positions' states are returned unmasked: XUT was trained on them (spec §4).
    """

    def __init__(self, tokenizer, model: torch.nn.Module) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or "<|endoftext|>"
        self.tokenizer.padding_side = "right"

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> TextEncoder:
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"text encoder folder {folder} has no config.json (expected a transformers model)"
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(
            folder, local_files_only=True, dtype=dtype, attn_implementation="sdpa"
        )
        return cls(tokenizer, model.to(device))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_count(self, prompt: str, *, max_length: int = MAX_TOKENS) -> int:
        """Tokens of ``prompt`` as `encode` sees it alone (the tokenizer only: no torch, no model call)."""
        ids = self.tokenizer(prompt, truncation=True, max_length=max_length, add_special_tokens=False)
        return len(ids["input_ids"])

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], *, padding: Padding = "longest", max_length: int = MAX_TOKENS
    ) -> Tensor:
        """prompts -> [B, T, hidden]; T = longest prompt (inference) or max_length (training)."""
        batch = self.tokenizer(
            list(prompts),
            padding=padding,
            truncation=True,
            max_length=max_length,
            add_special_tokens=False,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)
        if ids.shape[1] == 0:  # every prompt empty: a length-0 context, as the reference pipeline gives
            return torch.zeros(len(prompts), 0, self.hidden_size, device=self.device, dtype=self.model.dtype)
        out = self.model(input_ids=ids, attention_mask=batch["attention_mask"].to(self.device))
        return out.last_hidden_state

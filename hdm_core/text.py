"""Frozen causal-LM text encoder: the final hidden states (after the last norm) of a local folder (spec §4)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Padding = Literal["longest", "max_length"]

# Words the toy tokenizer learns as whole tokens: the synthetic dataset's vocabulary plus common glue words.
TOY_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "at",
    "with",
    "and",
    "to",
    "is",
    "by",
    "one",
    "two",
    "three",
    "small",
    "large",
    "big",
    "tiny",
    "medium",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "cyan",
    "magenta",
    "white",
    "black",
    "gray",
    "grey",
    "brown",
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "cross",
    "ring",
    "rectangle",
    "ellipse",
    "shape",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "centre",
    "middle",
    "upper",
    "lower",
    "corner",
    "background",
    "image",
    "picture",
    "photo",
    "drawing",
    "simple",
    "plain",
    "solid",
    "colour",
    "color",
    "dark",
    "light",
    "masterpiece",
    "best",
    "quality",
    "low",
    "worst",
    "newest",
    "recent",
    "old",
    "early",
]


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

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], *, padding: Padding = "longest", max_length: int = 256
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


def build_toy_text_encoder(
    folder: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    corpus: Iterable[str] = (),
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen3 model and a byte-level BPE Qwen2 tokenizer to `folder`, offline.

    For tests, benchmarks and the CPU demo: frozen random features still separate words, and XUT's `ctx_proj`
    learns to read them. Deterministic for a given seed and corpus.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = list(corpus)
    # Each word alone too, so a word opening a prompt (no leading space) is one token as well.
    texts = [" ".join(TOY_WORDS), *TOY_WORDS, *corpus, *(w for line in corpus for w in line.split())]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts * 4, vocab_size=1024, min_frequency=1, special_tokens=["<|endoftext|>"])
    raw = folder / "_bpe"
    raw.mkdir(exist_ok=True)
    bpe.save_model(str(raw))
    tokenizer = Qwen2Tokenizer(vocab=str(raw / "vocab.json"), merges=str(raw / "merges.txt"))
    tokenizer.save_pretrained(folder)
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3Model(config)
    model.save_pretrained(folder)
    log.info(
        "wrote a toy text encoder (%d-d, %d layers, vocab %d) to %s",
        hidden_size,
        num_layers,
        len(tokenizer),
        folder,
    )
    return folder

"""The toy text encoder of the demo and the tests: a tiny random Qwen3 and a word-level BPE tokenizer, built
offline into a local folder that `hdm_core.text.TextEncoder` loads like a real one."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

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

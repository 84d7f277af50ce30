"""The rules batching relies on: one seed rule for the API schema and the pipeline, and the context length the
worker's batch key predicts is the length the pipeline encodes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.schemas import ImageRequest
from hdm_core.batching import ImageJob
from hdm_core.config import MAX_SEED
from hdm_core.pipeline import HDMPipeline

PROMPTS = ["", "a", "a red circle", "a red circle on a blue square", "zebra unknownword ??", "red " * 300]


@pytest.fixture(scope="module")
def pipe(pixel_checkpoint, toy_text_encoder):
    return HDMPipeline.from_paths(pixel_checkpoint, toy_text_encoder)


@pytest.mark.parametrize("n", [1, 2, 8])
def test_the_largest_seed_the_api_accepts_is_the_largest_the_pipeline_takes(n: int) -> None:
    top = MAX_SEED - n + 1  # image i uses seed + i, each a 64-bit generator seed
    assert ImageRequest(prompt="x", seed=top, n=n).seed == top
    assert ImageJob("x", seed=top, n=n).seeds[-1] == MAX_SEED
    with pytest.raises(ValidationError, match="seed"):
        ImageRequest(prompt="x", seed=top + 1, n=n)
    with pytest.raises(ValueError, match="seed must be in"):
        ImageJob("x", seed=top + 1, n=n)
    with pytest.raises(ValueError, match="seed must be in"):
        ImageJob("x", seed=-1, n=n)


def test_the_largest_seed_samples(pipe: HDMPipeline) -> None:
    got = pipe.generate("a red circle", seed=MAX_SEED, width=16, height=16, steps=1)
    other = pipe.generate("a red circle", seed=MAX_SEED - 1, width=16, height=16, steps=1)
    assert got.seeds == [MAX_SEED] and (got.latents - other.latents).abs().max() > 1e-3


def test_context_length_is_the_encoded_length(pipe: HDMPipeline) -> None:
    lengths = set()
    for p in PROMPTS:
        # the pipeline's own encoding of a job alone: the transformers tokenizer + LM
        encoded = pipe._encode([p])
        assert pipe.context_length(p) == encoded.shape[1], p
        lengths.add(encoded.shape[1])
    assert len(lengths) >= 4 and max(lengths) == 256  # distinct lengths, and truncation counted


def test_context_length_of_a_model_with_a_caption_length(pipe: HDMPipeline) -> None:
    padded = HDMPipeline(pipe.model, pipe.codec, pipe.text_encoder, text_length=24)
    for p in PROMPTS:
        assert padded.context_length(p) == padded._encode([p]).shape[1] == 24

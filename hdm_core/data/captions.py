"""Caption processing for training (spec §7 caption grammar, plus whole-caption dropout for CFG).

Grammar: ``[keep tags |||] group %% group %% ...``; the keep-prefix and every group are split into tags by a
configurable separator (``$$`` in the reference pretraining configs, ``", "`` in its finetune example).
Per call: each non-keep tag is dropped with ``tag_dropout``, tags are shuffled inside their group, whole groups are
dropped with ``group_dropout`` and the groups are shuffled; the keep tags stay first, in order. The result is joined
with ``", "``. Finally the whole caption becomes ``""`` with probability ``caption_dropout`` (the unconditional
examples for classifier-free guidance; the reference has no explicit drop, spec §4 "CFG text dropout").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from .scan import read_caption, scan_images

KEEP_SEPARATOR = "|||"
GROUP_SEPARATOR = "%%"
JOINER = ", "

Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class CaptionConfig(BaseModel):
    """How captions are processed (the `[data.captions]` table); every probability is in [0, 1]."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    tag_separator: Annotated[str, Field(min_length=1)] = "$$"
    tag_dropout: Probability = 0.0  # reference pretraining: 0.25
    group_dropout: Probability = 0.0  # reference pretraining: 0.3
    shuffle_tags: bool = True
    shuffle_groups: bool = True
    caption_dropout: Probability = 0.1


@dataclass(frozen=True)
class ParsedCaption:
    """A caption split by the grammar, before any randomness."""

    keep: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]


def _split_tags(text: str, separator: str) -> tuple[str, ...]:
    return tuple(tag for tag in (part.strip() for part in text.split(separator)) if tag)


def parse_caption(text: str, separator: str) -> ParsedCaption:
    """Split raw caption text into keep tags and tag groups (empty tags and groups are discarded)."""
    text = text.replace("\r", " ").replace("\n", " ").strip()
    keep_text, sep, rest = text.partition(KEEP_SEPARATOR)
    if not sep:
        keep_text, rest = "", keep_text
    groups = tuple(g for g in (_split_tags(chunk, separator) for chunk in rest.split(GROUP_SEPARATOR)) if g)
    return ParsedCaption(keep=_split_tags(keep_text, separator), groups=groups)


def process_caption(text: str, config: CaptionConfig, rng: random.Random) -> str:
    """Apply the training-time caption transform once, drawing all randomness from `rng`."""
    # Whole-caption dropout is decided first so the number of draws does not depend on the caption length.
    if config.caption_dropout > 0 and rng.random() < config.caption_dropout:
        return ""
    parsed = parse_caption(text, config.tag_separator)
    groups: list[list[str]] = []
    for group in parsed.groups:
        if config.group_dropout > 0 and rng.random() < config.group_dropout:
            continue
        tags = [tag for tag in group if not (config.tag_dropout > 0 and rng.random() < config.tag_dropout)]
        if config.shuffle_tags:
            rng.shuffle(tags)
        if tags:
            groups.append(tags)
    if config.shuffle_groups:
        rng.shuffle(groups)
    return JOINER.join([*parsed.keep, *(tag for group in groups for tag in group)])


def clean_caption(text: str, separator: str) -> str:
    """The caption with the grammar's markers removed and nothing dropped or shuffled (used for previews)."""
    parsed = parse_caption(text, separator)
    return JOINER.join([*parsed.keep, *(tag for group in parsed.groups for tag in group)])


def distinct_prompts(source: str | Path, *, limit: int) -> list[str]:
    """Prompts to sample a model with (`hdm tune-schedule`): the lines of a text file, or the captions of a
    training-data folder (each image's same-stem `.txt`, hdm_core.data.scan; the caption grammar's markers removed,
    as for previews). Empty and repeated ones are dropped; more than `limit` are thinned to `limit` spread evenly
    over the list (file order; a folder's images sorted by path), so a large data set costs `limit` prompts."""
    source = Path(source)
    if source.is_dir():
        separator = CaptionConfig().tag_separator
        texts = [clean_caption(read_caption(img), separator) for img in scan_images(source)]
    else:
        texts = source.read_text(encoding="utf-8").splitlines()
    prompts = list(dict.fromkeys(t.strip() for t in texts if t.strip()))  # first-seen order
    if len(prompts) > limit:
        prompts = [prompts[i * len(prompts) // limit] for i in range(limit)]
    return prompts

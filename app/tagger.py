"""Captions for uploaded images without one: a WD14-style tagger (an ONNX image classifier + its tag CSV, run with
onnxruntime), the way kohya's `tag_images_by_wd14_tagger.py` tags Danbooru-style data, which is what HDM was trained
on. No torch.

The folder (``HDM_TAGGER``) holds ``model.onnx`` (one NHWC float32 input, BGR 0..255, square; one output of per-tag
probabilities) and ``selected_tags.csv`` (``tag_id,name,category,count``; category 9 = ratings, left out). An image
is padded to a white square and resized to the model's input size, as kohya does; tags at or above the threshold
(kohya's default 0.35) form the caption, most probable first, underscores as spaces."""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

RATING = "9"


@dataclass(frozen=True)
class Tagger:
    session: object  # onnxruntime.InferenceSession
    input_name: str
    size: int
    tags: tuple[str, ...]
    keep: tuple[bool, ...]
    threshold: float

    def caption(self, image: Image.Image) -> str:
        rgb = image.convert("RGB")
        side = max(rgb.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
        pixels = np.asarray(square.resize((self.size, self.size), Image.Resampling.BICUBIC), dtype=np.float32)
        batch = pixels[None, :, :, ::-1].copy()  # (1, H, W, 3) BGR
        (probs,) = self.session.run(None, {self.input_name: batch})  # type: ignore[attr-defined]
        scored = [(float(p), t) for p, t, k in zip(probs[0], self.tags, self.keep, strict=True) if k]
        chosen = sorted((s for s in scored if s[0] >= self.threshold), reverse=True)
        return ", ".join(t.replace("_", " ") for _, t in chosen)


@functools.lru_cache(maxsize=2)
def load(folder: Path, threshold: float = 0.35) -> Tagger:
    """The tagger of a folder (cached per process); ValueError naming what is missing or malformed."""
    import onnxruntime

    model, table = folder / "model.onnx", folder / "selected_tags.csv"
    if not model.is_file() or not table.is_file():
        raise ValueError(f"HDM_TAGGER {folder} must hold model.onnx and selected_tags.csv")
    with table.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise ValueError(f"{table} needs the columns name and category (WD14's selected_tags.csv)")
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    shape = inp.shape
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise ValueError(f"{model}: input must be NHWC (1, S, S, 3), is {shape}")
    n_out = session.get_outputs()[0].shape[-1]
    if isinstance(n_out, int) and n_out != len(rows):
        raise ValueError(f"{model} scores {n_out} tags but {table} lists {len(rows)}")
    return Tagger(
        session,
        inp.name,
        int(shape[1]),
        tuple(r["name"] for r in rows),
        tuple(r["category"] != RATING for r in rows),
        threshold,
    )

"""The one rule for which files of a data folder are training images (spec §7 layout). No torch: the API's
dataset validation calls it, so "validated: N images" is what the trainer reads.

Images are `.jpg .jpeg .png .webp` (any letter case) at the top level of the folder or one subfolder deep; deeper
files, hidden subfolders and other formats are not part of the data set. Each image may have a same-stem `.txt`
caption next to it (missing caption = empty caption).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # larger images are treated as decompression bombs and skipped


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def scan_images(root: str | Path) -> list[Path]:
    """Images at the top level of `root` or one folder deep (hidden folders skipped), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist or is not a folder")
    found: list[Path] = []
    for entry in root.iterdir():
        if is_image_file(entry):
            found.append(entry)
        elif entry.is_dir() and not entry.name.startswith("."):
            found.extend(p for p in entry.iterdir() if is_image_file(p))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_caption(image_path: Path) -> str:
    """The same-stem `.txt` next to the image, or "" if there is none."""
    caption_path = image_path.with_suffix(".txt")
    try:
        return caption_path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return ""


def dataset_stats(root: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """What a dataset validation reports for the images `scan_images` finds: counts, missing captions (first
    100), unreadable and oversized images (relative paths), and a histogram of the longer side in 256 px buckets."""
    from PIL import Image

    root = Path(root)
    stats: dict[str, Any] = {
        "images": 0,
        "captioned": 0,
        "missing_captions": [],
        "unreadable": [],
        "oversized": [],
    }
    hist: dict[str, int] = {}
    for path in scan_images(root):
        stats["images"] += 1
        rel = path.relative_to(root).as_posix()
        if path.with_suffix(".txt").is_file():
            stats["captioned"] += 1
        elif len(stats["missing_captions"]) < 100:
            stats["missing_captions"].append(rel)
        try:
            with Image.open(path) as im:
                w, h = im.size
                im.verify()
        except Exception:  # any decoder failure means the trainer would skip it too
            stats["unreadable"].append(rel)
            continue
        if w * h > max_pixels:
            stats["oversized"].append(rel)
        bucket = f"{(max(w, h) // 256) * 256}+"
        hist[bucket] = hist.get(bucket, 0) + 1
    stats["size_histogram"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0][:-1])))
    return stats

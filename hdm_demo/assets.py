"""Build the demo's assets once: the synthetic shapes set and the toy text encoder (reused when already there).

    python -m hdm_demo.assets --data var/demo/shapes --count 2000 --size 64 --text-encoder var/demo/toy-te

Either option may be given alone. A data folder written by another recipe (count, size, seed or the drawing code)
is regenerated; a text encoder folder that holds a `config.json` is reused as it is.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from hdm_demo.shapes import generate_dataset, is_generated
from hdm_demo.text_encoder import build_toy_text_encoder

log = logging.getLogger(__name__)


def ensure_shapes(folder: str | Path, *, count: int, size: int = 64, seed: int = 0) -> bool:
    """Write the shapes set into `folder` unless this recipe is already there; True if it was written."""
    if is_generated(folder, count=count, size=size, seed=seed):
        log.info("dataset: reusing %s", folder)
        return False
    generate_dataset(folder, count=count, size=size, seed=seed)
    log.info("dataset: wrote %d captioned images to %s", count, folder)
    return True


def ensure_text_encoder(folder: str | Path, *, hidden_size: int = 64, num_layers: int = 2) -> bool:
    """Build the toy text encoder into `folder` unless one is there; True if it was built."""
    if (Path(folder) / "config.json").is_file():
        log.info("text encoder: reusing %s", folder)
        return False
    build_toy_text_encoder(folder, hidden_size=hidden_size, num_layers=num_layers)
    log.info("text encoder: built a toy Qwen3 at %s", folder)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hdm_demo.assets", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder for the synthetic shapes set")
    parser.add_argument("--count", type=int, default=1000, help="images in the set")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-encoder", type=Path, help="folder for the toy text encoder")
    parser.add_argument("--hidden-size", type=int, default=64, help="= the model's ctx_dim")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.data is None and args.text_encoder is None:
        parser.error("give --data and/or --text-encoder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.data is not None:
            ensure_shapes(args.data, count=args.count, size=args.size, seed=args.seed)
        if args.text_encoder is not None:
            ensure_text_encoder(args.text_encoder, hidden_size=args.hidden_size, num_layers=args.layers)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m hdm_core.train CONFIG.toml --run-dir DIR` (also under torchrun: every rank runs this)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
from pathlib import Path

from hdm_core.allocator import keep_freed_memory
from hdm_core.train.config import TrainConfigError
from hdm_core.train.run import TrainingTerminated, run_training

logger = logging.getLogger("hdm_core.train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hdm_core.train", description="Train an HDM/XUT model.")
    parser.add_argument("config", type=Path, help="TOML training config")
    parser.add_argument(
        "--run-dir", type=Path, required=True, help="output folder (checkpoints, logs, samples)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps in total"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=args.log_level.upper() if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s",
    )
    # `kill -USR1 <rank>` writes every thread's Python stack to stderr (train.log under the service) and training
    # goes on: how a rank that stopped making progress is diagnosed. DataLoader workers inherit it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    keep_freed_memory()  # each step re-allocates the activations the last one freed (hdm_core/allocator.py)
    try:
        result = run_training(args.config, args.run_dir, resume=args.resume, max_steps=args.max_steps)
    except TrainConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except TrainingTerminated as exc:
        logger.warning("terminated by SIGTERM (%s)", exc)
        return 128 + signal.SIGTERM
    if rank == "0":
        summary = {
            "step": result.step,
            "stage": result.stage,
            "finished": result.finished,
            "loss": result.last_loss,
            "checkpoint": str(result.checkpoint or ""),
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The `tuned` schedule's knots: a search for the times that bring one sampler closest to the exact ODE solution
at one step count, on TRAINING prompts only (`python -m bench.schedule_search`).

    python -m bench.schedule_search [--run-dir var/runs/demo] [--checkpoint FILE] [--sampler unipc] [--steps 8]
                                    [--seeds 2] [--size 32] [--cfg 3.0] [--out FILE]

Method (the idea of Align Your Steps, Sabour et al. 2024: choose the steps for the model instead of a formula).
The objective is `bench.samplers`' distance: RMS pixel distance of the final images to the 400-step Euler solutions
of the same guided ODE from the same noise, averaged over the training prompts of `bench.samplers` (every
`--train-every`th training combination x `--seeds` seeds; the same cached references). The interior times move in
logit space, one at a time, by +-delta (kept strictly between their neighbours); a move is kept when it lowers
the objective; delta halves when a full pass keeps nothing, from 0.5 down to `--min-delta`. The start is the
uniform schedule. The held-out prompts are never drawn here: `bench.samplers` scores the result on them.
Prints the knots to paste into `hdm_core/samplers/schedules.py` (TUNED_KNOTS) and writes the search's log as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from bench.samplers import SEED_STRIDE, add_setup_args, draw, references, rms, set_up

log = logging.getLogger("bench.schedule_search")


def _logit(t: float) -> float:
    return math.log(t / (1 - t))


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def search(objective, steps: int, *, min_delta: float) -> tuple[list[float], float, list[dict]]:
    """Coordinate search over the interior times (see the module docstring). -> (knots, objective, history)."""
    z = [_logit(1 - i / steps) for i in range(1, steps)]  # uniform start, interior times only

    def knots(zs: list[float]) -> list[float]:
        return [1.0, *(_sigmoid(v) for v in zs), 0.0]

    best = objective(knots(z))
    history = [{"knots": knots(z), "distance": best}]
    delta = 0.5
    while delta >= min_delta:
        improved = False
        for i in range(len(z)):
            for sign in (1.0, -1.0):
                trial = list(z)
                trial[i] += sign * delta
                if (i > 0 and trial[i] >= trial[i - 1]) or (i + 1 < len(z) and trial[i] <= trial[i + 1]):
                    continue  # times must stay strictly decreasing
                d = objective(knots(trial))
                if d < best:
                    z, best, improved = trial, d, True
                    history.append({"knots": knots(z), "distance": best, "delta": delta})
                    log.info("distance %.5f  knots %s", best, [round(k, 4) for k in knots(z)])
                    break
        if not improved:
            delta /= 2
    return knots(z), best, history


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(p)  # the same checkpoint, prompt sets and cached references as bench.samplers
    p.add_argument("--sampler", default="unipc")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--min-delta", type=float, default=0.06)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_grad_enabled(False)
    pipe, ckpt, sets = set_up(args)
    common = {"size": args.size, "cfg": args.cfg}
    t0 = time.perf_counter()
    target = references(pipe, ckpt, sets, args.seeds, cache_dir=args.cache, **common)["train"]
    train = {"train": sets["train"]}

    def objective(knots: list[float]) -> float:
        return rms(
            draw(pipe, train, args.seeds, sampler=args.sampler, sigmas=knots, **common)["train"], target
        )

    knots, best, history = search(objective, args.steps, min_delta=args.min_delta)
    uniform = history[0]["distance"]
    out = (
        args.out
        or Path("bench/results")
        / f"schedule_search-{args.sampler}{args.steps}-{time.strftime('%Y%m%d')}.json"
    )
    meta = {"checkpoint": str(ckpt), "sampler": args.sampler, "steps": args.steps, "seeds": args.seeds}
    meta |= {
        "train_prompts": len(sets["train"]),
        "size": args.size,
        "cfg": args.cfg,
        "seed_stride": SEED_STRIDE,
    }
    meta["seconds"] = time.perf_counter() - t0
    result = {"meta": meta, "knots": knots, "train_distance": best, "uniform_train_distance": uniform}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result | {"history": history}, indent=1) + "\n")
    print(f"train distance: uniform {uniform:.5f} -> tuned {best:.5f} ({best / uniform:.2f}x)")
    print("TUNED_KNOTS = (" + ", ".join(f"{k:.4f}" for k in knots) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Every sampler x schedule x model-evaluation budget on the demo model: how close to the exact ODE solution, and
does the image still follow the prompt (`python -m bench.samplers`).

    python -m bench.samplers [--run-dir var/runs/demo] [--checkpoint FILE] [--text-encoder DIR]
                             [--nfe 4,6,8,12,16,24] [--seeds 2] [--size 32] [--cfg 3.0] [--out FILE]
                             [--tune auto|always|never]

Method. A budget is a number of model evaluations (NFE: guided forwards, each one batched CFG pass; Heun costs 2
per step except the last, so it runs the most steps that fit). For each prompt set (training prompts: every
`--train-every`th training combination of `hdm_demo.shapes`; held-out prompts: every `--heldout-every`th held-out
one, by default all 42) x `--seeds` seeds, the reference is a 400-step Euler solution of the same guided ODE from
the same noise. Distance = RMS over pixels
([0, 1] scale) of the decoded final image minus the reference's, averaged over images (lower is better); accuracy =
the demo scorer's colour / shape accuracy (`hdm_demo.scoring.score`, as `bench/demo_eval.py`) on held-out prompts.
Each sampler's best schedule is chosen on the TRAINING prompts (geometric mean of its distances over the budgets),
so the held-out numbers are not what was tuned on. The `tuned` schedule is the model's own: unless the checkpoint
already has one (`--tune auto`), the bench first searches it on the training prompts and their references, as
`hdm tune-schedule` does (hdm_core.samplers.tuning: UniPC and DPM++ 2M at 8 steps), and writes it beside the
checkpoint, where the service's `tuned` reads it. The stochastic samplers (euler_a, dpmpp_2m_sde) solve an SDE,
not the ODE: their distance to the ODE solution does not go to zero; they are scored on accuracy.
Writes the JSON (default bench/results/samplers-cpu-<date>.json) and prints the held-out table.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import time
from pathlib import Path

import torch

from hdm_core.batching import ImageJob
from hdm_core.config import SAMPLER_INFO, SAMPLER_NAMES, SCHEDULE_NAMES
from hdm_core.pipeline import HDMPipeline, to_pil
from hdm_core.samplers.schedules import TUNED_KNOTS, read_tuned_schedule, write_tuned_schedule
from hdm_core.samplers.tuning import tune_schedule
from hdm_demo.scoring import score
from hdm_demo.shapes import ShapeSpec, all_specs

log = logging.getLogger("bench.samplers")
REFERENCE_STEPS = 400
SEED_STRIDE = 1000  # seed s of a prompt set starts at s * 1000, as bench/demo_eval.py


def steps_for(sampler: str, nfe: int) -> int:
    """The most steps whose model evaluations fit in the budget."""
    info = SAMPLER_INFO[sampler]
    return max(s for s in range(1, nfe + 1) if info.evaluations(s) <= nfe)


def jobs_for(specs: list[ShapeSpec], seeds: int) -> list[ImageJob]:
    """One job per seed, every prompt of the set in it; image order = the set's prompts, seed after seed."""
    return [ImageJob([s.caption for s in specs], seed=SEED_STRIDE * k) for k in range(seeds)]


def draw_latents(
    pipe: HDMPipeline, sets: dict[str, list[ShapeSpec]], seeds: int, *, size: int, cfg: float, **kw
) -> dict[str, torch.Tensor]:
    """Final latents [N, C, h, w] per prompt set: every prompt with every seed, all in one batch."""
    jobs = [job for specs in sets.values() for job in jobs_for(specs, seeds)]
    results = pipe.generate_batch(jobs, width=size, height=size, guidance_scale=cfg, decode=False, **kw)
    it = iter(results)
    return {name: torch.cat([next(it).latents.float() for _ in range(seeds)]) for name in sets}  # type: ignore[union-attr]


def decode(pipe: HDMPipeline, latents: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1]."""
    return pipe.codec.decode(latents.to(pipe.dtype)).float().clamp(0, 1)


def draw(
    pipe: HDMPipeline, sets: dict[str, list[ShapeSpec]], seeds: int, *, size: int, cfg: float, **kw
) -> dict[str, torch.Tensor]:
    """Decoded images [N, 3, H, W] in [0, 1] per prompt set (`draw_latents`, decoded)."""
    return {k: decode(pipe, v) for k, v in draw_latents(pipe, sets, seeds, size=size, cfg=cfg, **kw).items()}


def references(
    pipe: HDMPipeline,
    ckpt: Path,
    sets: dict[str, list[ShapeSpec]],
    seeds: int,
    *,
    size: int,
    cfg: float,
    cache_dir: Path,
) -> dict[str, torch.Tensor]:
    """The 400-step Euler solutions' final latents of every prompt set, kept under cache_dir (keyed by checkpoint
    and settings)."""
    key = ["latents", str(ckpt.resolve()), ckpt.stat().st_mtime, size, cfg, seeds]
    key += [[s.caption for s in v] for v in sets.values()]
    cache = cache_dir / f"reference-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.pt"
    if cache.exists():
        return torch.load(cache)
    refs = draw_latents(
        pipe, sets, seeds, steps=REFERENCE_STEPS, sampler="euler", schedule="uniform", size=size, cfg=cfg
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(refs, cache)
    return refs


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean(dim=(1, 2, 3)).sqrt().mean().item()


def euler_nfe_for(distance: float, curve: dict[int, float]) -> float:
    """Euler's NFE at this distance, interpolated log-log along its measured curve (extrapolated past its ends)."""
    pts = sorted(curve.items())
    for (n0, d0), (n1, d1) in itertools.pairwise(pts):
        if d1 <= distance <= d0 or (n1, d1) == pts[-1]:
            w = (math.log(distance) - math.log(d0)) / (math.log(d1) - math.log(d0))
            return math.exp(math.log(n0) + w * (math.log(n1) - math.log(n0)))
    return float(pts[0][0])


def add_setup_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint, prompt sets and image settings."""
    p.add_argument("--run-dir", type=Path, default=Path("var/runs/demo"), help="a training run (config.json)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default RUN_DIR/final.safetensors")
    p.add_argument("--text-encoder", type=Path, default=None, help="default: the run's")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--train-every", type=int, default=19, help="every Nth training combination (12 of 228)")
    p.add_argument("--heldout-every", type=int, default=1, help="every Nth held-out combination (all 42)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cache", type=Path, default=Path("var/bench-samplers"), help="the references, kept")


def set_up(args: argparse.Namespace) -> tuple[HDMPipeline, Path, dict[str, list[ShapeSpec]]]:
    """(pipeline, checkpoint, prompt sets) from `add_setup_args`' arguments."""
    ckpt = args.checkpoint or args.run_dir / "final.safetensors"
    te = args.text_encoder or json.loads((args.run_dir / "config.json").read_text())["text_encoder"]["path"]
    sets = {
        "train": all_specs(heldout=False)[:: args.train_every],
        "heldout": all_specs(heldout=True)[:: args.heldout_every],
    }
    return HDMPipeline.from_paths(ckpt, te), ckpt, sets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(p)
    p.add_argument("--nfe", default="4,6,8,12,16,24")
    p.add_argument("--samplers", default=",".join(SAMPLER_NAMES))
    p.add_argument("--schedules", default=",".join(SCHEDULE_NAMES))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="summarise these results files as one")
    p.add_argument(
        "--tune",
        choices=("auto", "always", "never"),
        default="auto",
        help="search the model's own `tuned` schedule on the training prompts first: auto = when it has none",
    )
    p.add_argument("--tune-samplers", default="unipc,dpmpp_2m")
    p.add_argument("--tune-steps", type=int, default=8)
    args = p.parse_args()
    if args.merge:
        runs = [json.loads(f.read_text()) for f in args.merge]
        meta = {"merged": [str(f) for f in args.merge], "runs": [r["meta"] for r in runs]}
        out = args.out or Path("bench/results") / f"samplers-cpu-{time.strftime('%Y%m%d')}.json"
        return report([row for r in runs for row in r["rows"]], meta, out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, ckpt, sets = set_up(args)
    budgets = [int(n) for n in args.nfe.split(",")]
    samplers, schedules = args.samplers.split(","), args.schedules.split(",")
    common = {"size": args.size, "cfg": args.cfg}
    t0 = time.perf_counter()
    ref_latents = references(pipe, ckpt, sets, args.seeds, cache_dir=args.cache, **common)
    refs = {k: decode(pipe, v) for k, v in ref_latents.items()}
    log.info("references: %.0f s", time.perf_counter() - t0)
    rows = []
    out = args.out or Path("bench/results") / f"samplers-cpu-{time.strftime('%Y%m%d')}.json"
    meta = {"checkpoint": str(ckpt), "size": args.size, "guidance_scale": args.cfg, "seeds": args.seeds}
    meta |= {"prompts": {k: len(v) for k, v in sets.items()}, "reference": f"euler {REFERENCE_STEPS} uniform"}
    # What the exact ODE solution itself scores: the ceiling a sampler converging to it approaches.
    meta["reference_colour_shape"] = {
        k: [(sc := score(to_pil(refs[k]), specs * args.seeds)).colour, sc.shape] for k, specs in sets.items()
    }
    meta["tuned"] = tuned_schedule(pipe, ckpt, sets["train"], ref_latents["train"], args)
    out.parent.mkdir(parents=True, exist_ok=True)
    for sampler in samplers:
        # Euler is the reference's sampler and keeps its schedule (the baseline row).
        for schedule in ["uniform"] if sampler == "euler" else schedules:
            for nfe in budgets:
                steps = steps_for(sampler, nfe)
                row = {
                    "sampler": sampler,
                    "schedule": schedule,
                    "nfe": SAMPLER_INFO[sampler].evaluations(steps),
                }
                row |= {"budget": nfe, "steps": steps}
                drawn = draw(
                    pipe, sets, args.seeds, steps=steps, sampler=sampler, schedule=schedule, **common
                )
                for k, specs in sets.items():
                    images = drawn[k]
                    sc = score(to_pil(images), specs * args.seeds)
                    row |= {
                        f"{k}_distance": rms(images, refs[k]),
                        f"{k}_colour": sc.colour,
                        f"{k}_shape": sc.shape,
                    }
                log.info("%s", row)
                rows.append(row)
                out.write_text(json.dumps({"meta": meta, "partial": True, "rows": rows}, indent=1) + "\n")
    meta["seconds"] = time.perf_counter() - t0
    return report(rows, meta, out)


def tuned_schedule(
    pipe: HDMPipeline, ckpt: Path, train: list[ShapeSpec], reference: torch.Tensor, args: argparse.Namespace
) -> dict:
    """Make `pipe.tuned` the model's own schedule, searched on the training prompts only (see the docstring);
    returns what the results file records of it."""
    own = read_tuned_schedule(ckpt)
    searched = args.tune == "always" or (args.tune == "auto" and own is None)
    if searched:
        t0 = time.perf_counter()
        own = tune_schedule(
            pipe,
            jobs_for(train, args.seeds),
            reference,
            samplers=args.tune_samplers.split(","),
            steps=args.tune_steps,
            width=args.size,
            height=args.size,
            guidance_scale=args.cfg,
        )
        own.meta.update(prompts=len(train), seeds=args.seeds, source="bench.samplers training prompts")
        own.meta["seconds"] = round(time.perf_counter() - t0, 1)
        log.info("tuned schedule searched in %.0f s: %s", own.meta["seconds"], own.knots)
        write_tuned_schedule(ckpt, own)
    pipe.refresh_tuned_schedule()
    if own is None:
        return {"source": "shipped TUNED_KNOTS", "knots": {"*": list(TUNED_KNOTS)}}
    return {
        "source": "searched now" if searched else "the checkpoint's",
        "knots": own.knots,
        "meta": own.meta,
    }


def summarise(rows: list[dict]) -> tuple[dict[str, str], dict[str, dict[int, dict]], dict]:
    """Each sampler's best schedule on the training prompts, its rows by budget, and the issue's comparison."""
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    best: dict[str, str] = {}
    for sampler in samplers:
        logs: dict[str, list[float]] = {}
        for r in rows:
            if r["sampler"] == sampler:
                logs.setdefault(r["schedule"], []).append(math.log(r["train_distance"]))
        mean_log = {sch: sum(v) / len(v) for sch, v in logs.items()}
        # Euler keeps the reference's schedule (its row is the baseline); the others take their best.
        best[sampler] = "uniform" if sampler == "euler" else min(mean_log, key=mean_log.__getitem__)
    table = {
        s: {r["budget"]: r for r in rows if r["sampler"] == s and r["schedule"] == best[s]} for s in samplers
    }
    summary: dict = {"best_schedule_on_train": best}
    ode = [
        s for s in samplers if s not in ("euler", "heun") and not s.startswith(("euler_a", "dpmpp_2m_sde"))
    ]
    if "euler" not in table or 8 not in table["euler"] or not ode:
        return best, table, summary
    euler = {n: r["heldout_distance"] for n, r in table["euler"].items()}
    champion = min(ode, key=lambda s: table[s][8]["heldout_distance"])
    c8 = table[champion][8]
    summary |= {
        "best_new_sampler_at_8": champion,
        "its_schedule": best[champion],
        "its_heldout_distance_at_8": c8["heldout_distance"],
        "euler_heldout_distance_at_8": euler[8],
        "ratio_to_euler_at_8": c8["heldout_distance"] / euler[8],
        "euler_nfe_for_same_distance": euler_nfe_for(c8["heldout_distance"], euler),
        "its_heldout_colour_shape_at_8": [c8["heldout_colour"], c8["heldout_shape"]],
    }
    # The same comparison with the sampler too chosen on the training prompts (nothing picked on held-out ones).
    by_train = min(ode, key=lambda s: table[s][8]["train_distance"])
    summary["chosen_on_train_at_8"] = {
        "sampler": by_train,
        "schedule": best[by_train],
        "heldout_distance": table[by_train][8]["heldout_distance"],
        "ratio_to_euler": table[by_train][8]["heldout_distance"] / euler[8],
        "heldout_colour_shape": [table[by_train][8]["heldout_colour"], table[by_train][8]["heldout_shape"]],
    }
    if 24 in table["euler"]:
        summary["euler_heldout_colour_shape_at_24"] = [
            table["euler"][24]["heldout_colour"],
            table["euler"][24]["heldout_shape"],
        ]
    return best, table, summary


def report(rows: list[dict], meta: dict, out: Path) -> int:
    best, table, summary = summarise(rows)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    budgets = sorted({r["budget"] for r in rows})
    print(
        f"held-out RMS distance to {REFERENCE_STEPS}-step Euler (each sampler at its best schedule on train)"
    )
    print(f"{'sampler':14s}{'schedule':10s}" + "".join(f"{n:>8d}" for n in budgets) + "  colour/shape@8")
    for s, by_budget in table.items():
        r8 = by_budget.get(8)
        acc = f"  {r8['heldout_colour']:.2f}/{r8['heldout_shape']:.2f}" if r8 else ""
        cells = "".join(
            f"{by_budget[n]['heldout_distance']:8.4f}" if n in by_budget else f"{'-':>8s}" for n in budgets
        )
        print(f"{s:14s}{best[s]:10s}{cells}{acc}")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU benchmark of hdm_core, every number measured in this one run (`make bench` = `python -m bench.core`).

1. XUT forward and train step (flow loss + backward + AdamW), today's tree vs commit 14e55da (the commit before
   issue 11), at 256 image + 64 text tokens, batch 2: each version is one long-lived process with its own PYTHONPATH
   (the old one from `git archive`) that builds its model once and then answers "time N repeats of X" requests;
   the two alternate request by request (old first in even rounds, new first in odd ones), so every round is a
   pair measured under the same load. Ratio = old / new per round; median and IQR over the rounds.
2. Sampler overhead = sampling time / (steps x one guided forward), per repeat; min / median / max and IQR.
3. Pipeline level: 8 queued image jobs (same size, steps, sampler, guidance; different prompts and seeds) as one
   `generate_batch` vs eight `generate` calls, alternating per round: ratio = sequential time / batched time per
   round (= the images/s ratio); median and IQR. Its process keeps freed memory as the image workers do
   (hdm_core/allocator.py).
Every time is taken twice: wall clock and the process's CPU time. On a CPU shared with other work a one-thread
process's wall time mostly measures how long it waited for a core; its CPU time is the work the code did (still
raised somewhat by other processes sharing caches and memory bandwidth), so the ratios are given for both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE_COMMIT = "14e55da"
CORE_CASES = {
    # name: XUTConfig fields (everything else default); 32x32 latent, patch 2 -> 256 image tokens; 64 text tokens.
    "dim256": dict(
        dim=256,
        heads=4,
        head_dim=64,
        mlp_dim=768,
        ctx_dim=256,
        ctx_size=64,
        depth=2,
        enc_blocks=1,
        dec_blocks=2,
        tread_pre=1,
        tread_post=1,
    ),
    "xut-debug": None,
}


def _timed(fn) -> tuple[float, float]:
    """(wall s, CPU s of this process) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _median_time(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    return [_timed(fn)[0] for _ in range(repeats)]


def core_case(name: str) -> dict:
    """The measured calls of one case, built against whichever hdm_core is on PYTHONPATH (today's or 14e55da's):
    only APIs both have."""
    from hdm_core import PRESETS, XUT, XUTConfig
    from hdm_core.flow import flow_loss

    fields = CORE_CASES[name]
    cfg = PRESETS["xut-debug"] if fields is None else XUTConfig(**fields)
    torch.manual_seed(0)
    model = XUT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 32, 32, generator=g)
    ctx, t, addon = torch.randn(2, 64, cfg.ctx_dim, generator=g), torch.tensor([0.3, 0.7]), torch.zeros(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x, t, ctx, addon_info=addon)

    def train_step() -> None:
        model.train()  # routes at the config's TREAD rate (0.5), as training does
        opt.zero_grad(set_to_none=True)
        flow_loss(
            model,
            x,
            ctx,
            addon_info=addon,
            generator=torch.Generator().manual_seed(1),
            route_generators=[torch.Generator().manual_seed(i) for i in range(2)],
        ).backward()
        opt.step()

    return {"forward": forward, "train_step": train_step}


def serve_core(name: str) -> None:
    """Worker loop: build the case, warm it up, then answer "METRIC REPEATS" lines with [[wall, cpu], ...]."""
    import hdm_core

    calls = core_case(name)
    for fn in calls.values():
        fn()
        fn()
    print(json.dumps({"hdm_core": str(Path(hdm_core.__file__).parent), "threads": torch.get_num_threads()}))
    sys.stdout.flush()
    for line in sys.stdin:
        metric, repeats = line.split()
        print(json.dumps([_timed(calls[metric]) for _ in range(int(repeats))]), flush=True)


class _CoreWorker:
    """One long-lived measuring process of one version (see the module docstring)."""

    def __init__(self, case: str, pythonpath: str, threads: int) -> None:
        # `python -m` puts the working directory first on sys.path: run from the first PYTHONPATH entry.
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.core",
                "--worker",
                "core",
                "--case",
                case,
                "--threads",
                str(threads),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": pythonpath},
            cwd=pythonpath.split(os.pathsep)[0],
        )
        self.info = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a measuring process exited (rc {self.proc.wait()})")
        return json.loads(line)

    def measure(self, metric: str, repeats: int) -> tuple[float, float]:
        """Median (wall, cpu) of `repeats` calls."""
        self.proc.stdin.write(f"{metric} {repeats}\n")
        self.proc.stdin.flush()
        times = self._read()
        return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _summary(old: list[float], new: list[float]) -> dict:
    """Per-round pairs -> medians and the old / new ratio's median and IQR over the rounds."""
    ratios = [o / n for o, n in zip(old, new, strict=True)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "old": statistics.median(old),
        "new": statistics.median(new),
        "ratio": statistics.median(ratios),
        "ratio_q1": q[0],
        "ratio_q3": q[2],
        "ratios": ratios,
    }


def compare_core(
    case: str, paths: dict[str, str], base: Path, rounds: int, repeats: int, threads: int
) -> dict:
    workers = {which: _CoreWorker(case, paths[which], threads) for which in ("old", "new")}
    try:
        if not workers["old"].info["hdm_core"].startswith(str(base)):
            raise RuntimeError(f"the base run imported {workers['old'].info['hdm_core']}, not {base}")
        times = {(w, m, k): [] for w in workers for m in ("forward", "train_step") for k in ("wall", "cpu")}
        for r in range(rounds):
            for metric in ("forward", "train_step"):
                for which in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    wall, cpu = workers[which].measure(metric, repeats)
                    times[which, metric, "wall"].append(wall)
                    times[which, metric, "cpu"].append(cpu)
    finally:
        for w in workers.values():
            w.close()
    return {
        metric: {k: _summary(times["old", metric, k], times["new", metric, k]) for k in ("wall", "cpu")}
        for metric in ("forward", "train_step")
    }


def sampler_overhead(repeats: int) -> dict:
    from hdm_core import PRESETS, XUT, position_map
    from hdm_core.pipeline import sample_latents
    from hdm_core.sampler import Conditioning

    cfg, steps = PRESETS["xut-debug"], 8
    torch.manual_seed(0)
    model = XUT(cfg).eval()
    pos, addon = position_map(32, 32)[None], torch.zeros(1)
    cond = Conditioning(torch.randn(1, 64, cfg.ctx_dim), pos, addon)
    uncond = Conditioning(torch.randn(1, 64, cfg.ctx_dim), pos, addon)
    noise = torch.randn(1, cfg.in_channels, 32, 32)
    x2, t2 = noise.repeat(2, 1, 1, 1), torch.full((2,), 0.5)
    ctx2, pos2, addon2 = torch.cat([cond.ctx, uncond.ctx]), torch.cat([pos, pos]), addon.repeat(2)
    ratios = []
    with torch.no_grad():
        for _ in range(repeats):  # forward and sampling measured back to back, so both see the same load
            fwd = statistics.median(
                _median_time(lambda: model(x2, t2, ctx2, pos_map=pos2, addon_info=addon2), 5, warmup=1)
            )
            smp = _median_time(
                lambda: sample_latents(model, noise, cond, uncond, steps=steps, guidance_scale=3.0),
                1,
                warmup=1,
            )[0]
            ratios.append(smp / (steps * fwd))
    q = statistics.quantiles(ratios, n=4)
    return {
        "steps": steps,
        "ratios": ratios,
        "min": min(ratios),
        "median": statistics.median(ratios),
        "max": max(ratios),
        "iqr": q[2] - q[0],
    }


def batched_vs_sequential(rounds: int) -> dict:
    from hdm_core import PRESETS, XUT
    from hdm_core.allocator import keep_freed_memory
    from hdm_core.batching import ImageJob
    from hdm_core.codec import PixelCodec
    from hdm_core.pipeline import HDMPipeline
    from hdm_core.text import TextEncoder
    from hdm_demo.text_encoder import build_toy_text_encoder

    keep_freed_memory()  # the process setup of an image worker (worker/model_cache.py)
    with tempfile.TemporaryDirectory() as tmp:
        te = TextEncoder.from_pretrained(build_toy_text_encoder(Path(tmp) / "te", hidden_size=64))
    torch.manual_seed(0)
    pipe = HDMPipeline(XUT(PRESETS["xut-pixel-debug"]), PixelCodec(), te)
    prompts = ["a red circle", "a big square", "a blue square", "a red square"]  # equal token counts
    jobs = [ImageJob(prompts[i % 4], seed=100 + i, negative_prompt="noisy") for i in range(8)]
    kw = dict(width=32, height=32, steps=8, guidance_scale=3.0)

    def sequential() -> None:
        for j in jobs:
            pipe.generate(j.prompt, negative_prompt=j.negative_prompt, seed=j.seed, **kw)

    calls = {"sequential": sequential, "batched": lambda: pipe.generate_batch(jobs, **kw)}
    for fn in calls.values():
        fn()
    times = {(c, k): [] for c in calls for k in ("wall", "cpu")}
    for r in range(rounds):
        for which in ("sequential", "batched") if r % 2 == 0 else ("batched", "sequential"):
            wall, cpu = _timed(calls[which])
            times[which, "wall"].append(wall)
            times[which, "cpu"].append(cpu)
    return {
        "jobs": len(jobs),
        "size": "32x32 px xut-pixel-debug",
        "steps": 8,
        # "old" = one at a time, "new" = batched: ratio = sequential time / batched time = the images/s ratio
        **{k: _summary(times["sequential", k], times["batched", k]) for k in ("wall", "cpu")},
    }


def _child(args: list[str], pythonpath: str, threads: int) -> dict:
    # `python -m` puts the working directory first on sys.path: run from the first PYTHONPATH entry.
    env = {**os.environ, "PYTHONPATH": pythonpath}
    out = subprocess.run(
        [sys.executable, "-m", "bench.core", *args, "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=pythonpath.split(os.pathsep)[0],
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _extract_base(dest: Path) -> Path:
    archive = subprocess.run(
        ["git", "archive", BASE_COMMIT, "hdm_core"], check=True, capture_output=True, cwd=ROOT
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", choices=["core", "sampler", "batch"], help="internal: one measurement")
    parser.add_argument("--case", choices=sorted(CORE_CASES))
    parser.add_argument("--repeats", type=int, default=3, help="calls per version and round (their median)")
    parser.add_argument(
        "--rounds", type=int, default=15, help="paired old/new rounds per case (also batched/sequential)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per measuring process (1: a shared CPU oversubscribes OpenMP teams)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker == "core":
        serve_core(args.case)
        return
    if args.worker == "sampler":
        print(json.dumps(sampler_overhead(args.repeats)))
        return
    if args.worker == "batch":
        print(json.dumps(batched_vs_sequential(args.repeats)))
        return

    results: dict = {
        "base_commit": BASE_COMMIT,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "threads": args.threads,
        "load_avg_start": os.getloadavg(),
        "core": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        base = _extract_base(Path(tmp))
        paths = {"old": f"{base}{os.pathsep}{ROOT}", "new": str(ROOT)}
        print(
            f"{'case':<11}{'':<12}{'old ms':>9}{'new ms':>9}{'old/new':>9}{'IQR':>13}   (paired rounds: "
            f"{args.rounds} x {args.repeats} repeats, batch 2, 256 image + 64 text tokens, {args.threads} thread(s))"
        )
        for case in CORE_CASES:
            row = compare_core(case, paths, base, args.rounds, args.repeats, args.threads)
            for metric, kinds in row.items():
                for kind, m in kinds.items():
                    print(
                        f"{case:<11}{metric + ' ' + kind:<12}{m['old'] * 1e3:>9.1f}{m['new'] * 1e3:>9.1f}"
                        f"{m['ratio']:>8.3f}x  {m['ratio_q1']:.3f}-{m['ratio_q3']:.3f}"
                    )
            results["core"][case] = row
    smp = _child(["--worker", "sampler", "--repeats", "9"], str(ROOT), args.threads)
    results["sampler_overhead"] = smp
    print(
        f"sampler overhead (xut-debug, {smp['steps']} Euler steps, CFG): min {smp['min']:.3f}  median "
        f"{smp['median']:.3f}  max {smp['max']:.3f}  IQR {smp['iqr']:.3f}  ({len(smp['ratios'])} repeats)"
    )
    bat = _child(["--worker", "batch", "--repeats", str(args.rounds)], str(ROOT), args.threads)
    results["pipeline_batching"] = bat
    for kind in ("wall", "cpu"):
        m = bat[kind]
        print(
            f"pipeline batching, {bat['jobs']} queued jobs ({bat['size']}, {bat['steps']} steps, CFG), {kind}: "
            f"one at a time {m['old']:.2f} s, generate_batch {m['new']:.2f} s, ratio {m['ratio']:.3f}x "
            f"(IQR {m['ratio_q1']:.3f}-{m['ratio_q3']:.3f}, {len(m['ratios'])} rounds)"
        )
    results["load_avg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

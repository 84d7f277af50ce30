"""End-to-end training runs on CPU: DDP equivalence, kill + resume, progressive stages, fine-tuning, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hdm_core import XUT, load_checkpoint, save_checkpoint
from hdm_core.codec import PixelCodec
from hdm_core.train import fan_in, lr_factor, run_training
from hdm_core.train.config import TrainConfigError, load_config
from hdm_core.train.run_dir import STATE_FILE, RunDir, load_training_state

from .conftest import REPO, TINY_MODEL, final_weights, read_metrics, train_cli

# Different float summation order (DDP's all-reduce vs. accumulating micro-batches in one process) is the only
# difference; after the AdamW steps below the weights agree far inside this bound.
DDP_ATOL = 1e-5


def test_ddp_two_ranks_match_single_process(make_config: Callable[..., Path], tmp_path: Path) -> None:
    """2 ranks x micro-batch 2 (gloo, real torchrun) == 1 process x micro-batch 2 x grad_accum 2: same global
    batch of 4, same samples, same noise, same TREAD routes."""
    stage = {"resolution": 16, "batch_size": 2, "lr": 0.5, "steps": 2, "tread_rate": 0.5}
    single_cfg = make_config("single.toml", stages=[{**stage, "grad_accum": 2}])
    ddp_cfg = make_config("ddp.toml", stages=[{**stage, "grad_accum": 1}])
    single = train_cli(str(single_cfg), "--run-dir", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "hdm_core.train",
            str(ddp_cfg),
            "--run-dir",
            str(tmp_path / "ddp"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # Both ranks hold identical weights: every checkpoint records each rank's weight fingerprint.
    manifest = json.loads((tmp_path / "ddp" / "checkpoints" / "manifest.json").read_text())
    for entry in manifest["checkpoints"]:
        assert entry["world_size"] == 2
        assert len(entry["rank_fingerprints"]) == 2
        assert entry["rank_fingerprints"][0] == entry["rank_fingerprints"][1]
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    torch.manual_seed(7)  # the config's seed: the initial weights both runs started from
    start = XUT(load_checkpoint(tmp_path / "single" / "final.safetensors").config).state_dict()
    moved, diff = 0.0, 0.0
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=DDP_ATOL, rtol=0)
        diff = max(diff, float((b[key] - value).abs().max()))
        moved = max(moved, float((value - start[key.removeprefix("unet.model.")]).abs().max()))
    print(f"DDP vs single-process max |dw| = {diff:.3g}; max |w - w0| = {moved:.3g}")
    assert moved > 100 * DDP_ATOL  # training really changed the weights, so the comparison means something
    la = [r["loss"] for r in read_metrics(tmp_path / "single")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "ddp")]
    assert la == pytest.approx(lb, abs=1e-5)


def test_sigkill_mid_stage_then_resume_matches_uninterrupted(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    stages = [{"resolution": 16, "batch_size": 2, "grad_accum": 2, "lr": 0.5, "steps": 14, "tread_rate": 0.5}]
    cfg = make_config(
        stages=stages,
        data={"path": str(load_config_path_data(make_config)), "num_workers": 1},
        train={"checkpoint_every": 3, "keep_last_n": 2, "num_threads": 1},
    )
    ref = train_cli(str(cfg), "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hdm_core.train", str(cfg), "--run-dir", str(run)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # not asked to stop: no chance to write anything
    proc.wait(timeout=30)
    assert not (run / "final.safetensors").exists()
    done_before = len(read_metrics_tolerant(run))
    assert 8 <= done_before < 14

    resumed = train_cli(str(cfg), "--run-dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    ref_log, new_log = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in new_log] == list(range(1, 15))
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in new_log] == [
        (r["loss"], r["lr"], r["grad_norm"]) for r in ref_log
    ]
    a, b = final_weights(tmp_path / "ref"), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def load_config_path_data(make_config: Callable[..., Path]) -> str:
    return load_config(make_config("probe.toml")).data.path


def read_metrics_tolerant(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def test_half_written_checkpoint_is_never_loaded(make_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = make_config(
        stages=[{"resolution": 16, "batch_size": 2, "lr": 0.5, "steps": 4}],
        train={"checkpoint_every": 1, "keep_last_n": 3, "num_threads": 1},
    )
    run = tmp_path / "run"
    result = run_training(load_config(cfg), run, max_steps=3)
    assert result.step == 3 and not result.finished
    ckpt_dir = run / "checkpoints"
    manager = RunDir(run)
    assert [e["step"] for e in manager.read_manifest()] == [1, 2, 3]
    # Damage the newest checkpoint (as a crash inside a non-atomic write would) and leave debris of a save that
    # never finished: a temp folder and a step folder the manifest does not list.
    state = ckpt_dir / "step-00000003" / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (ckpt_dir / ".tmp-step-00000004-x").mkdir()
    (ckpt_dir / ".tmp-step-00000004-x" / STATE_FILE).write_bytes(b"partial")
    (ckpt_dir / "step-00000009").mkdir()
    latest = manager.latest_snapshot()
    assert latest is not None and latest.step == 2
    resumed = run_training(load_config(cfg), run, resume=True)
    assert resumed.finished and resumed.step == 4
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]  # step 3 was redone from checkpoint 2
    assert not (ckpt_dir / ".tmp-step-00000004-x").exists() and not (ckpt_dir / "step-00000009").exists()
    # A manifest that is garbage (never produced by the atomic writer, but possible on a broken disk) is ignored.
    (ckpt_dir / "manifest.json").write_text("{not json")
    assert manager.latest_snapshot() is None


def test_progressive_stages_change_resolution_and_keep_optimizer_state(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    stages = [
        {"name": "low", "resolution": 16, "batch_size": 2, "lr": 0.5, "steps": 3, "tread_rate": 0.5},
        {
            "name": "high",
            "resolution": 32,
            "batch_size": 1,
            "grad_accum": 2,
            "lr": 0.2,
            "steps": 2,
            "tread_rate": 0.0,
            "warmup_steps": 0,
            "betas": [0.9, 0.995],
        },
    ]
    cfg = make_config(stages=stages, train={"checkpoint_every": 100, "keep_last_n": 2, "num_threads": 1})
    result = run_training(load_config(cfg), tmp_path / "run")
    assert result.finished and result.step == 5
    log = read_metrics(tmp_path / "run")
    assert [(r["stage_name"], r["resolution"]) for r in log] == [("low", 16)] * 3 + [("high", 32)] * 2
    assert log[3]["lr"] == pytest.approx(0.2)  # no warmup in stage 2: the cosine starts at the stage's lr
    manifest = RunDir(tmp_path / "run").read_manifest()
    assert [e["step"] for e in manifest] == [3, 5]  # a checkpoint at every stage end
    state = load_training_state(tmp_path / "run" / "checkpoints" / "step-00000005" / STATE_FILE)
    # Adam's per-parameter step count and moments carried over from stage 1 (5 steps, not 2).
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {5.0}
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.995)
    assert state["stage"] == 1 and state["step_in_stage"] == 2


def test_finetune_starts_from_checkpoint_weights(make_config: Callable[..., Path], tmp_path: Path) -> None:
    arch = load_config(make_config("probe.toml")).resolve_model_config()
    assert arch is not None
    torch.manual_seed(1234)
    source = XUT(arch)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # nothing like a fresh init (zero-init layers included)
    src_path = save_checkpoint(tmp_path / "base.safetensors", source, codec=PixelCodec())
    cfg = make_config(
        model={"init_from": str(src_path)},
        stages=[{"resolution": 16, "batch_size": 2, "lr": 1e-6, "steps": 1}],
    )
    result = run_training(load_config(cfg), tmp_path / "ft")
    assert result.finished
    tuned = load_checkpoint(tmp_path / "ft" / "final.safetensors").model.state_dict()
    fresh = XUT(arch).state_dict()
    for key, value in source.state_dict().items():
        # One AdamW step moves a weight by at most ~lr / fan_in (plus decay): the run started from `source`.
        assert float((tuned[key] - value).abs().max()) < 1e-5, key
    assert max(float((tuned[k] - fresh[k]).abs().max()) for k in fresh) > 0.1


def test_sigterm_saves_a_checkpoint_then_exits_promptly(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A preempted or cancelled run (SIGTERM) keeps every step it made: a snapshot at the last logged step."""
    cfg = make_config(
        stages=[{"resolution": 16, "batch_size": 2, "lr": 0.5, "steps": 100000}],
        train={"checkpoint_every": 100000, "keep_last_n": 1, "num_threads": 1},
    )
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hdm_core.train", str(cfg), "--run-dir", str(run)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2
    ):
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=20)
    assert rc == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 10
    assert "terminated by SIGTERM" in (proc.stderr.read() if proc.stderr else "")
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    saved = [
        e["step"] for e in json.loads((run / "checkpoints" / "manifest.json").read_text())["checkpoints"]
    ]
    assert last >= 2 and saved == [last], (last, saved)


def test_config_errors_name_the_field(make_config: Callable[..., Path]) -> None:
    bad = make_config(stages=[{"resolution": 16, "batch_size": 0, "lr": 0.5, "steps": 1}])
    with pytest.raises(TrainConfigError, match=r"stages\[0\]\.batch_size"):
        load_config(bad)
    out = train_cli(str(bad), "--run-dir", "/nonexistent/never-created")
    assert out.returncode == 2 and "stages[0].batch_size" in out.stderr
    with pytest.raises(TrainConfigError, match="model"):
        load_config(make_config(model={**TINY_MODEL, "init_from": "x.safetensors"}))
    with pytest.raises(TrainConfigError, match=r"train\.precision"):
        load_config(make_config(train={"precision": "fp8"}))
    with pytest.raises(TrainConfigError, match=r"objective\.t_logit_std"):
        load_config(make_config(objective={"t_logit_std": 0.0}))


def test_objective_time_distribution_changes_training(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """t_logit_mean moves the sampled times; the default stays the reference's logit-normal(0, 1)."""
    stages = [{"resolution": 16, "batch_size": 2, "lr": 0.5, "steps": 2}]
    default = run_training(load_config(make_config(stages=stages)), tmp_path / "a").last_loss
    explicit = run_training(
        load_config(make_config(stages=stages, objective={"t_logit_mean": 0.0, "t_logit_std": 1.0})),
        tmp_path / "b",
    ).last_loss
    shifted = run_training(
        load_config(make_config(stages=stages, objective={"t_logit_mean": 3.0})), tmp_path / "c"
    ).last_loss
    assert default == explicit  # same draws: the section only names the reference's values
    assert shifted != default
    # The caption length the run padded to is recorded for inference (HDMPipeline.text_length).
    from hdm_core.checkpoint import TEXT_LENGTH_KEY, load_checkpoint

    for path in (
        tmp_path / "a" / "final.safetensors",
        *(tmp_path / "a" / "checkpoints").glob("step-*/model.safetensors"),
    ):
        assert load_checkpoint(path).metadata[TEXT_LENGTH_KEY] == "8", path


def test_fresh_run_refuses_a_run_dir_with_checkpoints(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = load_config(make_config(stages=[{"resolution": 16, "batch_size": 1, "lr": 0.5, "steps": 1}]))
    assert run_training(cfg, tmp_path / "run").finished
    with pytest.raises(TrainConfigError, match="--resume"):
        run_training(cfg, tmp_path / "run")
    again = run_training(cfg, tmp_path / "run", resume=True)  # nothing left to do: returns at once
    assert again.finished and again.step == 1


def test_fan_in_and_schedule() -> None:
    assert fan_in(torch.empty(1024, 1024)) == 1024  # Linear: in_features
    assert fan_in(torch.empty(1024, 4, 2, 2)) == 16  # conv: in_ch * k * k
    assert fan_in(torch.empty(16, 16, 2)) == 32  # RoPE freqs (spec §6)
    assert fan_in(torch.empty(1024)) == 1024  # 1-D: numel
    assert 0.5 / fan_in(torch.empty(1024, 1)) == 0.5  # the addon Linear(1 -> 1024) gets the base lr
    assert lr_factor(0, 100, 10, "cosine", 0.01) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine", 0.01) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine", 0.01) == pytest.approx(0.01)
    assert lr_factor(55, 100, 10, "constant", 0.01) == 1.0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_checkpointing_ema_and_samples(
    make_config: Callable[..., Path], tmp_path: Path, precision: str
) -> None:
    cfg = make_config(
        model={**TINY_MODEL, "gradient_checkpointing": True},
        train={
            "precision": precision,
            "ema_decay": 0.9,
            "checkpoint_every": 100,
            "keep_last_n": 1,
            "num_threads": 1,
        },
        sampling={"every": 2, "prompts": ["a red circle at the center on a white background"], "steps": 2},
        stages=[{"resolution": 16, "batch_size": 2, "lr": 0.5, "steps": 2}],
    )
    result = run_training(load_config(cfg), tmp_path / "run")
    assert result.finished and result.last_loss is not None and result.last_loss > 0
    log = read_metrics(tmp_path / "run")
    assert all(r["grad_norm"] >= 0 for r in log)
    if precision == "fp16":
        assert log[-1]["grad_scale"] > 1  # the GradScaler is active
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    ema = load_checkpoint(ckpt / "model_ema.safetensors").model.state_dict()
    raw = load_checkpoint(ckpt / "model.safetensors").model.state_dict()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    assert (tmp_path / "run" / "samples" / "step-00000002.png").is_file()


def test_sigusr1_dumps_every_thread_stack_and_training_goes_on(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """How a rank that stopped making progress is diagnosed (`kill -USR1`): its stacks land in its stderr."""
    stages = [{"resolution": 16, "batch_size": 2, "lr": 0.5, "steps": 400}]
    cfg = make_config(
        stages=stages,
        data={"path": str(load_config_path_data(make_config)), "num_workers": 1},
        train={"checkpoint_every": 1000, "num_threads": 1},
    )
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    with err.open("wb") as errf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hdm_core.train", str(cfg), "--run-dir", str(run)],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=errf,
        )
    try:
        metrics = run / "metrics.jsonl"

        def steps() -> int:
            return len(read_metrics_tolerant(run)) if metrics.exists() else 0

        deadline = time.monotonic() + 120
        while steps() < 2:
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        seen = steps()
        while steps() < seen + 3:
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()[-3000:]
            time.sleep(0.05)
        dump = err.read_text()
        assert "Current thread" in dump and "hdm_core/train/loop.py" in dump, dump[-3000:]
    finally:
        proc.kill()
        proc.wait(timeout=30)

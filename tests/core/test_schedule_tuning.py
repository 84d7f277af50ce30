"""A model's own `tuned` schedule: the search, the file beside the checkpoint, the pipeline (and a long-lived
worker's cached pipeline) reading it, `hdm tune-schedule`, and a retrained checkpoint dropping the stale one."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil

import pytest
import torch
from PIL import Image

from app import cli
from hdm_core import PRESETS, XUT, save_checkpoint
from hdm_core.batching import ImageJob
from hdm_core.codec import PixelCodec
from hdm_core.data.captions import distinct_prompts
from hdm_core.pipeline import HDMPipeline
from hdm_core.samplers.schedules import (
    TUNED_KNOTS,
    TunedSchedule,
    read_tuned_schedule,
    schedule_file,
    timesteps,
    write_tuned_schedule,
)
from hdm_core.samplers.tuning import search_knots

GEN = dict(width=16, height=16, guidance_scale=2.0, decode=False)
OWN = (1.0, 0.97, 0.9, 0.75, 0.5, 0.3, 0.12, 0.04, 0.0)  # 8 steps, far from the shipped knots


@pytest.fixture
def ckpt(pixel_checkpoint, tmp_path):
    """A private copy of the tiny pixel model, so a schedule written beside it stays in this test."""
    return shutil.copy(pixel_checkpoint, tmp_path / "model.safetensors")


def _latents(pipe, **kw):
    (r,) = pipe.generate_batch([ImageJob(["a red circle", "a blue square"], seed=5)], **GEN, **kw)
    return r.latents


def test_search_finds_a_known_optimum_and_keeps_times_strictly_decreasing():
    target = [1.0, 0.95, 0.8, 0.55, 0.2, 0.0]
    calls = []

    def objective(knots):
        calls.append(knots)
        assert knots[0] == 1.0 and knots[-1] == 0.0
        assert all(a > b for a, b in itertools.pairwise(knots))
        return sum((a - b) ** 2 for a, b in zip(knots, target, strict=True))

    res = search_knots(objective, 5, min_delta=0.01)
    assert res.evaluations == len(calls)
    assert res.uniform_distance == pytest.approx(objective([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]))
    assert res.distance < 0.01 * res.uniform_distance
    assert max(abs(a - b) for a, b in zip(res.knots, target, strict=True)) < 0.02
    with pytest.raises(ValueError, match="steps"):
        search_knots(objective, 1)


def test_schedule_file_round_trips_and_refuses_what_is_not_a_schedule(tmp_path):
    assert schedule_file(tmp_path / "m.safetensors") == tmp_path / "m.schedule.json"
    assert schedule_file(tmp_path) == tmp_path / "schedule.json"  # a diffusers-style folder
    s = TunedSchedule({"unipc": OWN}, {"steps": 8})
    write_tuned_schedule(tmp_path / "m.safetensors", s)
    assert read_tuned_schedule(tmp_path / "m.safetensors") == s
    assert read_tuned_schedule(tmp_path / "other.safetensors") is None
    assert s.for_sampler("unipc") == OWN and s.for_sampler("dpmpp_2m") == OWN  # the first searched
    for bad in ({"unipc": [1.0, 0.6, 0.7, 0.0]}, {"unipc": [0.9, 0.5, 0.0]}, {}):
        with pytest.raises(ValueError):
            TunedSchedule(bad)
    for text in ("[]", '{"format": "other", "knots": {"unipc": [1, 0]}}', "{not json"):
        with pytest.raises(ValueError, match="not a tuned schedule"):
            TunedSchedule.from_json(text)


def test_the_tuned_schedule_is_the_models_own_when_it_has_one(ckpt, toy_text_encoder, caplog):
    plain = HDMPipeline.from_paths(ckpt, toy_text_encoder)
    assert plain.tuned is None
    shipped = _latents(plain, steps=8, sampler="unipc", schedule="tuned")
    torch.testing.assert_close(shipped, _latents(plain, sampler="unipc", sigmas=TUNED_KNOTS), rtol=0, atol=0)

    write_tuned_schedule(ckpt, TunedSchedule({"unipc": OWN}))
    pipe = HDMPipeline.from_paths(ckpt, toy_text_encoder)
    own = _latents(pipe, steps=8, sampler="unipc", schedule="tuned")
    torch.testing.assert_close(own, _latents(pipe, sampler="unipc", sigmas=OWN), rtol=0, atol=0)
    assert (own - shipped).abs().max() > 1e-3
    # A sampler without knots of its own takes the first sampler's; other step counts read them off.
    dpm = _latents(pipe, steps=8, sampler="dpmpp_2m", schedule="tuned")
    torch.testing.assert_close(dpm, _latents(pipe, sampler="dpmpp_2m", sigmas=OWN), rtol=0, atol=0)
    torch.testing.assert_close(timesteps(4, schedule="tuned", tuned_knots=OWN), torch.tensor(OWN[::2]))
    # Other schedules are untouched by the model's knots.
    torch.testing.assert_close(
        _latents(pipe, steps=8, sampler="unipc", schedule="karras"),
        _latents(plain, steps=8, sampler="unipc", schedule="karras"),
        rtol=0,
        atol=0,
    )

    # The same pipeline follows the file: a new search, a broken file (logged, shipped knots), none.
    other = (1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.2, 0.1, 0.0)
    write_tuned_schedule(ckpt, TunedSchedule({"unipc": other}))
    assert pipe.refresh_tuned_schedule() and pipe.tuned.for_sampler("unipc") == other
    assert not pipe.refresh_tuned_schedule()  # unchanged file: not read again
    path = schedule_file(ckpt)
    path.write_text('{"format": "hdm-tuned-schedule/1", "knots": {"unipc": [1, 0.2, 0.5, 0]}}')
    os.utime(path, ns=(1, 1))
    with caplog.at_level(logging.WARNING):
        assert pipe.refresh_tuned_schedule()
    assert pipe.tuned is None and "ignoring the tuned schedule" in caplog.text
    torch.testing.assert_close(_latents(pipe, steps=8, sampler="unipc", schedule="tuned"), shipped)
    write_tuned_schedule(ckpt, TunedSchedule({"unipc": other}))
    assert pipe.refresh_tuned_schedule() and pipe.tuned is not None
    path.unlink()
    assert pipe.refresh_tuned_schedule() and pipe.tuned is None


def test_a_cached_worker_pipeline_reads_a_new_schedule_without_reloading(ckpt, toy_text_encoder):
    from worker import model_cache

    pipe, loaded = model_cache.get_pipeline(str(ckpt), toy_text_encoder, "cpu")
    assert loaded and pipe.tuned is None
    write_tuned_schedule(ckpt, TunedSchedule({"unipc": OWN}))
    again, loaded = model_cache.get_pipeline(str(ckpt), toy_text_encoder, "cpu")
    assert again is pipe and not loaded
    assert pipe.tuned is not None and pipe.tuned.for_sampler("unipc") == OWN


def test_saving_new_weights_drops_the_schedule_searched_for_the_old_ones(ckpt):
    write_tuned_schedule(ckpt, TunedSchedule({"unipc": OWN}))
    assert schedule_file(ckpt).exists()
    save_checkpoint(ckpt, XUT(PRESETS["xut-pixel-debug"]), codec=PixelCodec())
    assert not schedule_file(ckpt).exists()


def test_hdm_tune_schedule_writes_the_knots_it_scored_for_each_sampler(
    ckpt, toy_text_encoder, tmp_path, capsys
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    base = ["tune-schedule", "--model", str(ckpt), "--prompts", str(prompts)]
    base += ["--text-encoder", str(toy_text_encoder), "--width", "16", "--height", "16", "--seed", "7"]
    settings = ["--guidance-scale", "2.0", "--reference-steps", "24", "--steps", "3", "--min-delta", "0.5"]
    assert (
        cli.main([*base, *settings, "--width", "17"]) == 2
    )  # not a multiple of the patch: refused, nothing written
    assert not schedule_file(ckpt).exists()
    assert cli.main([*base, *settings, "--samplers", "unipc,euler"]) == 0
    assert (
        torch.is_grad_enabled()
    )  # the command leaves no global torch state behind (it runs in-process here)
    assert str(schedule_file(ckpt)) in capsys.readouterr().out
    body = json.loads(schedule_file(ckpt).read_text())
    assert set(body["knots"]) == {"unipc", "euler"}
    assert body["meta"]["prompts"] == 2 and body["meta"]["seeds"] == 2 and body["meta"]["steps"] == 3
    tuned = read_tuned_schedule(ckpt)
    assert all(len(k) == 4 for k in tuned.knots.values())

    # Score the written knots here, apart from the search: the same images (2 prompts x 2 seeds from --seed 7)
    # against the same 24-step Euler solution.
    pipe = HDMPipeline.from_paths(ckpt, toy_text_encoder)
    jobs = [ImageJob(["a red circle", "a blue square"], seed=7 + 2 * k) for k in range(2)]
    kw = dict(GEN, guidance_scale=2.0)
    exact = torch.cat([r.latents for r in pipe.generate_batch(jobs, steps=24, sampler="euler", **kw)])

    def dist(sampler, **sched):
        lat = torch.cat([r.latents for r in pipe.generate_batch(jobs, sampler=sampler, **kw, **sched)])
        return (lat - exact).square().flatten(1).mean(1).sqrt().mean().item()

    for sampler in ("unipc", "euler"):
        found = body["meta"]["found"][sampler]
        assert dist(sampler, sigmas=tuned.knots[sampler]) == pytest.approx(found["distance"], rel=1e-5)
        assert dist(sampler, steps=3, schedule="uniform") == pytest.approx(
            found["uniform_distance"], rel=1e-5
        )
        assert found["distance"] <= found["uniform_distance"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--steps", "1", "--steps: must be >= 2"),
        ("--samplers", "unipc,nope", "unknown sampler"),
        ("--min-delta", "0", "--min-delta: must be in"),
        ("--seeds", "0", "--seeds: must be >= 1"),
    ],
)
def test_hdm_tune_schedule_refuses_bad_arguments_by_name(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune-schedule", "--model", "m", "--prompts", "p", flag, value])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_prompts_come_from_a_text_file_or_a_data_folders_captions(tmp_path, capsys):
    lines = tmp_path / "p.txt"
    lines.write_text("b cat\n\n a dog \nb cat\n")
    assert distinct_prompts(lines, limit=10) == ["b cat", "a dog"]
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for i, (folder, caption) in enumerate([(data, "1girl ||| red $$ hat %% smile"), (data / "sub", "a dog")]):
        Image.new("RGB", (8, 8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    Image.new("RGB", (8, 8)).save(data / "uncaptioned.png")
    (data / "notes.txt").write_text("not a caption: no image of that name")
    assert distinct_prompts(data, limit=10) == ["1girl, red, hat, smile", "a dog"]
    many = tmp_path / "many.txt"
    many.write_text("\n".join(f"prompt {i:03d}" for i in range(100)))
    thinned = distinct_prompts(many, limit=8)
    assert thinned == [f"prompt {i:03d}" for i in (0, 12, 25, 37, 50, 62, 75, 87)]  # evenly over the 100
    empty = tmp_path / "empty"
    empty.mkdir()
    for source in (empty, tmp_path / "missing.txt"):
        args = ["tune-schedule", "--model", "m.safetensors", "--prompts", str(source), "--text-encoder", "x"]
        assert cli.main(args) == 2

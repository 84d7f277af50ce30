"""Data pipeline: caption grammar, shifted square crop (spec §7), robust loading, the resumable sampler."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hdm_core.data import (
    CaptionedImageDataset,
    StageSampler,
    StreamLayout,
    collate,
    dataset_stats,
    make_loader,
    resized_size,
    scan_images,
    shifted_square_crop,
)
from hdm_core.data.captions import CaptionConfig, parse_caption, process_caption
from hdm_demo.shapes import generate_dataset

NO_DROP = CaptionConfig(tag_separator="$$", caption_dropout=0.0, shuffle_tags=False, shuffle_groups=False)


def spec_position_grid(h: int, w: int) -> torch.Tensor:
    """Spec §2 written out independently: cell centres, long side spans [-1, 1], (y, x), shape [h, w, 2]."""
    long = max(h, w)

    def centres(n: int) -> torch.Tensor:
        span = n / long
        return torch.tensor([-span + (2 * span) * (i + 0.5) / n for i in range(n)], dtype=torch.float64)

    ys, xs = centres(h), centres(w)
    return torch.stack([ys[:, None].expand(h, w), xs[None, :].expand(h, w)], dim=-1)


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(arr.numpy(), "RGB")


# --- captions ---------------------------------------------------------------------------------------------------


def test_caption_grammar_keep_prefix_groups_and_tags() -> None:
    parsed = parse_caption("1girl$$solo|||red hair$$blue eyes%%smile$$ %% outdoors", "$$")
    assert parsed.keep == ("1girl", "solo")
    assert parsed.groups == (("red hair", "blue eyes"), ("smile",), ("outdoors",))
    assert process_caption("1girl$$solo|||red hair$$blue eyes%%smile", NO_DROP, random.Random(0)) == (
        "1girl, solo, red hair, blue eyes, smile"
    )


def test_caption_dropouts_and_shuffle() -> None:
    text = "keep|||a$$b$$c%%d$$e%%f"
    all_tags = CaptionConfig(tag_dropout=1.0, caption_dropout=0.0)
    assert process_caption(text, all_tags, random.Random(1)) == "keep"  # keep tags are never dropped
    all_groups = CaptionConfig(group_dropout=1.0, caption_dropout=0.0)
    assert process_caption(text, all_groups, random.Random(1)) == "keep"
    shuffled = {
        process_caption(text, CaptionConfig(caption_dropout=0.0), random.Random(s)) for s in range(50)
    }
    assert len(shuffled) > 10
    assert all(c.startswith("keep, ") and sorted(c.split(", ")[1:]) == list("abcdef") for c in shuffled)
    # The ", " separator of the finetune example.
    comma = CaptionConfig(tag_separator=", ", caption_dropout=0.0, shuffle_tags=False, shuffle_groups=False)
    assert process_caption("x, y%%z", comma, random.Random(0)) == "x, y, z"


def test_whole_caption_dropout_rate() -> None:
    cfg = CaptionConfig(caption_dropout=0.1)
    empty = sum(process_caption("a$$b", cfg, random.Random(s)) == "" for s in range(4000))
    assert 0.08 < empty / 4000 < 0.12
    assert process_caption("a$$b", CaptionConfig(caption_dropout=0.0), random.Random(3)) != ""
    with pytest.raises(ValueError, match="tag_dropout"):
        CaptionConfig(tag_dropout=1.5)


# --- shifted square crop ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("w", "h"), [(100, 60), (60, 100), (77, 77), (300, 64)])
def test_shifted_square_crop_pixels_inside_and_consistent(w: int, h: int) -> None:
    size = 48
    img = noise_image(w, h)
    new_w, new_h = resized_size(w, h, size)
    assert min(new_w, new_h) == size
    resized = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    long_side = max(new_w, new_h)
    offsets = set()
    for seed in range(60):
        crop = shifted_square_crop(img, size, random.Random(seed))
        offsets.add(crop.offset)
        # Offset uniform in [0, long - short): the square always lies inside the resized image.
        assert 0 <= crop.offset < max(long_side - size, 1)
        assert crop.offset + size <= long_side
        box = (
            (crop.offset, 0, crop.offset + size, size)
            if new_w >= new_h
            else (0, crop.offset, size, crop.offset + size)
        )
        expected = (
            torch.frombuffer(bytearray(resized.crop(box).tobytes()), dtype=torch.uint8)
            .view(size, size, 3)
            .float()
        )
        expected = expected.permute(2, 0, 1) / 127.5 - 1
        assert crop.pixels.shape == (3, size, size)
        torch.testing.assert_close(crop.pixels, expected, atol=1e-6, rtol=0)
        assert crop.pixels.min() >= -1.0 and crop.pixels.max() <= 1.0
        # Position map: the pixel-resolution map of the resized image, cropped with the same offset.
        grid = spec_position_grid(new_h, new_w)
        cut = (
            grid[:, crop.offset : crop.offset + size]
            if new_w >= new_h
            else grid[crop.offset : crop.offset + size]
        )
        torch.testing.assert_close(crop.pos_map.double(), cut.reshape(-1, 2), atol=1e-6, rtol=0)
        # ln(W/H) of the resized image, before the crop.
        assert crop.addon == pytest.approx(math.log(new_w / new_h))
    if long_side > size:
        assert len(offsets) > 1
    else:
        assert offsets == {0}


def test_crop_offsets_cover_the_exclusive_range() -> None:
    img = noise_image(60, 50)  # resized to 57x48 at size 48: offsets 0..8
    offsets = {shifted_square_crop(img, 48, random.Random(s)).offset for s in range(400)}
    assert offsets == set(range(57 - 48))


def test_crop_position_map_area_reduced_to_latent() -> None:
    img = noise_image(128, 80)
    crop_px = shifted_square_crop(img, 64, random.Random(7))
    crop_lat = shifted_square_crop(img, 64, random.Random(7), downsample=8)
    assert crop_lat.offset == crop_px.offset
    assert crop_lat.pos_map.shape == (64, 2)
    full = crop_px.pos_map.view(64, 64, 2).permute(2, 0, 1)[None]
    pooled = F.avg_pool2d(full, 8)[0].permute(1, 2, 0).reshape(64, 2)
    torch.testing.assert_close(crop_lat.pos_map, pooled, atol=1e-6, rtol=0)
    assert float(crop_lat.pos_map[:, 1].mean()) == pytest.approx(
        float(crop_px.pos_map[:, 1].mean()), abs=1e-5
    )
    with pytest.raises(ValueError, match="multiple"):
        shifted_square_crop(img, 60, random.Random(0), downsample=8)


# --- folder layout, robust loading --------------------------------------------------------------------------------


def test_folder_layout_and_missing_captions(tmp_path: Path) -> None:
    noise_image(40, 30).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("cap a")
    (tmp_path / "sub").mkdir()
    noise_image(30, 40).save(tmp_path / "sub" / "b.JPG")
    noise_image(30, 30).save(tmp_path / "sub" / "c.webp")
    (tmp_path / "sub" / "deeper").mkdir()
    noise_image(30, 30).save(tmp_path / "sub" / "deeper" / "ignored.png")
    (tmp_path / "notes.txt").write_text("not an image")
    files = scan_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.png", "sub/b.JPG", "sub/c.webp"]
    ds = CaptionedImageDataset(tmp_path, size=16, captions=NO_DROP)
    assert ds[(0, 1)]["caption"] == "cap a"
    assert ds[(1, 1)]["caption"] == ""


def test_broken_images_are_skipped_and_counted(tmp_path: Path) -> None:
    noise_image(40, 40).save(tmp_path / "good.png")
    noise_image(64, 64).save(tmp_path / "trunc.png")
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg" * 10)
    noise_image(200, 200).save(tmp_path / "bomb.png")  # 40,000 px > max_pixels below
    ds = CaptionedImageDataset(tmp_path, size=16, captions=NO_DROP, max_pixels=5000)
    names = [p.name for p in ds.files]
    samples = [ds[(names.index(n), 3)] for n in ("bomb.png", "garbage.jpg", "trunc.png", "good.png")]
    for s in samples:
        assert names[s["index"]] == "good.png"  # every failure is replaced by the only readable image
        assert s["pixels"].shape == (3, 16, 16)
    assert [s["skipped"] >= 1 for s in samples] == [True, True, True, False]
    # Through a DataLoader with a worker process, the skip count comes back with the batch.
    layout = StreamLayout(micro_batch=4, grad_accum=1, world_size=1)
    loader = make_loader(ds, StageSampler(len(ds), layout, rank=0, seed=0, stage=0), num_workers=1)
    batch = next(iter(loader))
    assert batch["pixels"].shape == (4, 3, 16, 16)
    assert batch["skipped"] >= 3


def test_every_file_unreadable_raises_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"nope")
    ds = CaptionedImageDataset(tmp_path, size=16, captions=NO_DROP, max_retries=2)
    with pytest.raises(RuntimeError, match="could not be read"):
        ds[(0, 0)]


# --- sampler ----------------------------------------------------------------------------------------------------


def _take(sampler: StageSampler, n: int) -> list[tuple[int, int]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_distributed_split_matches_single_process_accumulation() -> None:
    n, mb, steps = 13, 3, 5
    single = StageSampler(n, StreamLayout(mb, 2, 1), rank=0, seed=5, stage=1)
    ranks = [StageSampler(n, StreamLayout(mb, 1, 2), rank=r, seed=5, stage=1) for r in range(2)]
    s = _take(single, steps * 2 * mb)
    r0, r1 = (_take(r, steps * mb) for r in ranks)
    for step in range(steps):
        chunk = s[step * 2 * mb : (step + 1) * 2 * mb]
        assert chunk[:mb] == r0[step * mb : (step + 1) * mb]  # micro-step 0 == rank 0
        assert chunk[mb:] == r1[step * mb : (step + 1) * mb]  # micro-step 1 == rank 1
    # Every epoch visits every image exactly once.
    first_epoch = [i for i, _ in _take(StageSampler(n, StreamLayout(1, 1, 1), rank=0, seed=5, stage=1), n)]
    assert sorted(first_epoch) == list(range(n))
    assert first_epoch != list(range(n))


def test_sampler_resume_reproduces_the_stream() -> None:
    layout = StreamLayout(4, 2, 3)
    full = _take(StageSampler(10, layout, rank=2, seed=1, stage=0), 8 * 7)
    resumed = _take(StageSampler(10, layout, rank=2, seed=1, stage=0, start_step=3), 8 * 4)
    assert resumed == full[8 * 3 :]
    other_stage = _take(StageSampler(10, layout, rank=2, seed=1, stage=1), 8 * 7)
    assert other_stage != full


def test_dataset_is_deterministic_per_sample_seed(tmp_path: Path) -> None:
    generate_dataset(tmp_path, count=6, size=40)
    ds = CaptionedImageDataset(tmp_path, size=32, captions=CaptionConfig(caption_dropout=0.5))
    a, b = ds[(2, 99)], ds[(2, 99)]
    assert torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"]
    batch = collate([ds[(i, i)] for i in range(3)])
    assert batch["pixels"].shape == (3, 3, 32, 32) and batch["pos_map"].shape == (3, 32 * 32, 2)
    assert batch["addon"].shape == (3,) and len(batch["captions"]) == 3


def test_dataset_stats_count_what_the_trainer_reads(tmp_path: Path) -> None:
    """One scan rule: validation counts exactly the files the data set trains on (no .bmp, no 2-deep files)."""
    noise_image(40, 30).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("cap a")
    noise_image(30, 30).save(tmp_path / "b.bmp")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    noise_image(30, 40).save(tmp_path / "sub" / "c.jpeg")
    noise_image(30, 30).save(tmp_path / "sub" / "deeper" / "d.png")
    (tmp_path / "sub" / "broken.webp").write_bytes(b"not an image")
    stats = dataset_stats(tmp_path)
    ds = CaptionedImageDataset(tmp_path, size=16, captions=NO_DROP)
    assert stats["images"] == len(ds) == len(scan_images(tmp_path)) == 3
    assert stats["captioned"] == 1 and stats["missing_captions"] == ["sub/broken.webp", "sub/c.jpeg"]
    assert stats["unreadable"] == ["sub/broken.webp"] and stats["size_histogram"] == {"0+": 2}


def test_scan_and_config_import_without_torch() -> None:
    """The API imports these; it never imports torch."""
    code = (
        "import sys, hdm_core.data, hdm_core.data.scan, hdm_core.train, hdm_core.train.config, hdm_core.files;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])

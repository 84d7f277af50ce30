"""The demo path end to end through HTTP (shortened schedule): service, dataset, train job, image jobs, report.

Run twice on the same state folder: the second run must reuse the environment's text encoder and dataset.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _run(var: Path, out: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--quick", "--var", str(var), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_demo_quick_twice(tmp_path):
    var, out = tmp_path / "var", tmp_path / "out"
    first = _run(var, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_job"].startswith("train_") and summary["model"].startswith("ckpt_")
    assert len(summary["images"]) == 4
    for f in summary["images"]:
        with Image.open(f) as img:
            assert img.size == (32, 32)
            assert "a " in img.info["parameters"]  # the A1111-style parameters chunk carries the prompt
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size[0] >= 4 * 64
    with Image.open(out / "loss_curve.png") as curve:
        assert len(curve.getcolors(maxcolors=1 << 16)) > 2
    assert "built a toy Qwen3" in first and "wrote 64 captioned images" in first
    assert "Stopping the service" in first

    dataset_mtime = (var / "data" / "shapes" / "heldout.json").stat().st_mtime
    second = _run(var, out)
    assert "text encoder: reusing" in second and "dataset: reusing" in second
    assert (var / "data" / "shapes" / "heldout.json").stat().st_mtime == dataset_mtime
    assert json.loads((out / "summary.json").read_text())["train_job"] != summary["train_job"]

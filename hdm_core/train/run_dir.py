"""A training run's folder: config, metrics log, resumable snapshots with a manifest, final weights.

Layout of ``run_dir/`` (the worker and docs/training.md read it; names on disk are unchanged)::

    config.json                              # the validated config of the run
    metrics.jsonl                            # one JSON object per logged optimizer step
    checkpoints/step-00000500/model.safetensors      # weights via hdm_core.save_checkpoint (load_checkpoint reads it)
    checkpoints/step-00000500/training_state.pt      # optimizer, grad scaler, step, stage, data position, RNG
    checkpoints/step-00000500/model_ema.safetensors  # only with train.ema_decay > 0
    checkpoints/step-00000500/adapter.safetensors    # [adapter] runs: the adapter (save_adapter), no model copy
    checkpoints/manifest.json                # the complete snapshots, oldest first, with sha256 per file
    final.safetensors                        # when every stage has finished
    final_adapter.safetensors                # [adapter] runs, instead of final.safetensors

In code a step folder is a *snapshot* (weights + training state); "checkpoint" means the weights file format.
A snapshot is written into a hidden temp folder, every file fsynced, the folder renamed into place, and only then
added to the manifest (itself replaced atomically). Resume reads the manifest newest first and verifies every file's
size and sha256, so a half-written or damaged snapshot is never loaded: it is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdm_core.files import atomic_write_text, fsync_dir, fsync_file, sha256_file
from hdm_core.train.config import TrainConfig, TrainConfigError

logger = logging.getLogger(__name__)

SNAPSHOTS = "checkpoints"  # the folder name on disk (read by the worker)
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"  # instead of MODEL_FILE in an [adapter] run
EMA_FILE = "model_ema.safetensors"
STATE_FILE = "training_state.pt"
STATE_VERSION = 1


@dataclass(frozen=True)
class TrainingResult:
    """What `run_training` returns."""

    run_dir: Path
    step: int  # optimizer steps completed in total
    stage: int  # index of the stage the run ended in
    finished: bool  # every stage ran to its end
    last_loss: float | None
    checkpoint: Path | None  # the newest snapshot folder written by this call


@dataclass(frozen=True)
class Snapshot:
    name: str
    path: Path
    step: int
    info: dict[str, Any]


class RunDir:
    """Rank 0 writes through one of these per run; `latest_snapshot` may be called by every rank (read only)."""

    def __init__(self, root: str | Path, *, keep_last_n: int = 3) -> None:
        self.root = Path(root)
        self.dir = self.root / SNAPSHOTS
        self.keep_last_n = keep_last_n

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def final_path(self) -> Path:
        return self.root / "final.safetensors"

    @property
    def final_adapter_path(self) -> Path:
        return self.root / "final_adapter.safetensors"

    def start(self, cfg: TrainConfig, *, resume: bool) -> None:
        """Rank 0, before training: record the config; a fresh run refuses a folder that holds snapshots."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        if resume:
            return
        if self.read_manifest():
            raise TrainConfigError(
                f"--run-dir: {self.root} already holds checkpoints; pass --resume to continue that run "
                "or choose a new run folder"
            )
        self.metrics_path.unlink(missing_ok=True)

    def read_manifest(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (
            OSError,
            json.JSONDecodeError,
        ) as exc:  # cannot happen with atomic writes, but never crash on it
            logger.warning("snapshot manifest %s unreadable (%s); ignoring it", self.manifest_path, exc)
            return []
        entries = data.get("checkpoints", []) if isinstance(data, dict) else []
        return [e for e in entries if isinstance(e, dict) and "name" in e and "step" in e]

    def _write_manifest(self, entries: list[dict[str, Any]]) -> None:
        atomic_write_text(self.manifest_path, json.dumps({"checkpoints": entries}, indent=1) + "\n")

    def save_snapshot(self, step: int, write_files: Callable[[Path], None], info: dict[str, Any]) -> Path:
        """Create `step-NNNNNNNN/` atomically: `write_files(tmp_folder)` writes the files, then rename + manifest."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        final = self.dir / name
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.dir))
        try:
            write_files(tmp)
            files = {}
            for f in sorted(tmp.iterdir()):
                fsync_file(f)
                files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            fsync_dir(tmp)
            entries = [e for e in self.read_manifest() if e["name"] != name]
            if final.exists():  # re-saving the same step (e.g. after a resume): drop the old copy first
                self._write_manifest(entries)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry = {"name": name, "step": step, "files": files, "saved_at": time.time(), **info}
        entries.append(entry)
        entries.sort(key=lambda e: e["step"])
        stale = entries[: max(0, len(entries) - self.keep_last_n)]
        entries = entries[len(stale) :]
        self._write_manifest(entries)  # the manifest forgets old snapshots before their folders go
        for old in stale:
            shutil.rmtree(self.dir / old["name"], ignore_errors=True)
        self._remove_leftovers(keep={e["name"] for e in entries})
        logger.info("saved snapshot %s", final)
        return final

    def _remove_leftovers(self, keep: set[str]) -> None:
        """Temp folders of interrupted saves, and step folders the manifest does not list."""
        for child in self.dir.iterdir():
            leftover = child.name.startswith((".tmp-", "step-")) and child.name not in keep
            if leftover and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)

    def verify(self, entry: dict[str, Any]) -> str | None:
        """None if every listed file is present with the recorded size and sha256, else what is wrong."""
        folder = self.dir / entry["name"]
        files = entry.get("files") or {}
        if STATE_FILE not in files or not ({MODEL_FILE, ADAPTER_FILE} & set(files)):
            return "manifest entry lists no model/training state"
        for fname, meta in files.items():
            path = folder / fname
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != meta.get("bytes"):
                return f"{path} has {path.stat().st_size} bytes, expected {meta.get('bytes')}"
            if sha256_file(path) != meta.get("sha256"):
                return f"{path} does not match its sha256"
        return None

    def latest_snapshot(self) -> Snapshot | None:
        """The newest manifest entry whose files verify; damaged ones are skipped with a warning."""
        for entry in reversed(self.read_manifest()):
            problem = self.verify(entry)
            if problem is None:
                return Snapshot(entry["name"], self.dir / entry["name"], int(entry["step"]), entry)
            logger.warning("not resuming from snapshot %s: %s", entry["name"], problem)
        return None

    def truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the snapshot (and a torn last line), so the log matches the state."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                kept.append(line)
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{k}\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    import torch

    torch.save(state, path)


def load_training_state(path: Path) -> dict[str, Any]:
    import torch

    # Only tensors, numbers, strings and containers: the safe loader suffices.
    return torch.load(path, map_location="cpu", weights_only=True)

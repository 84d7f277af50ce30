"""Training checkpoints: atomic step folders, a manifest, retention, and finding the newest valid one.

Layout under ``run_dir/checkpoints/``::

    step-00000500/model.safetensors      # released layout via hdm_core.save_checkpoint (load_checkpoint reads it)
    step-00000500/training_state.pt      # optimizer, grad scaler, step, stage, sampler position, per-rank RNG
    step-00000500/model_ema.safetensors  # only with train.ema_decay > 0
    manifest.json                        # the checkpoints that are complete, oldest first, with sha256 per file

A checkpoint is written into a hidden temp folder, every file fsynced, the folder renamed into place, and only then
added to the manifest (itself replaced atomically). Resume reads the manifest newest first and verifies every file's
size and sha256, so a half-written or damaged checkpoint is never loaded: it is skipped with a warning.
"""

from __future__ import annotations

import hashlib
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

import torch

from .checkpoint import atomic_write, fsync_dir, fsync_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
STATE_FILE = "training_state.pt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@dataclass(frozen=True)
class CheckpointEntry:
    name: str
    path: Path
    step: int
    info: dict[str, Any]


class CheckpointManager:
    """Rank 0 owns one of these per run; `latest_valid` may be called by every rank (read only)."""

    def __init__(self, run_dir: str | Path, *, keep_last_n: int = 3) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last_n = keep_last_n

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def read_manifest(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (
            OSError,
            json.JSONDecodeError,
        ) as exc:  # cannot happen with atomic writes, but never crash on it
            logger.warning("checkpoint manifest %s unreadable (%s); ignoring it", self.manifest_path, exc)
            return []
        entries = data.get("checkpoints", []) if isinstance(data, dict) else []
        return [e for e in entries if isinstance(e, dict) and "name" in e and "step" in e]

    def _write_manifest(self, entries: list[dict[str, Any]]) -> None:
        atomic_write_text(self.manifest_path, json.dumps({"checkpoints": entries}, indent=1) + "\n")

    def save(self, step: int, write_files: Callable[[Path], None], info: dict[str, Any]) -> Path:
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
        self._write_manifest(entries)  # the manifest forgets old checkpoints before their folders go
        for old in stale:
            shutil.rmtree(self.dir / old["name"], ignore_errors=True)
        self._remove_leftovers(keep={e["name"] for e in entries})
        logger.info("saved checkpoint %s", final)
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
        if STATE_FILE not in files or MODEL_FILE not in files:
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

    def latest_valid(self) -> CheckpointEntry | None:
        """The newest manifest entry whose files verify; damaged ones are skipped with a warning."""
        for entry in reversed(self.read_manifest()):
            problem = self.verify(entry)
            if problem is None:
                return CheckpointEntry(entry["name"], self.dir / entry["name"], int(entry["step"]), entry)
            logger.warning("not resuming from checkpoint %s: %s", entry["name"], problem)
        return None


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def load_training_state(path: Path) -> dict[str, Any]:
    # Only tensors, numbers, strings and containers: the safe loader suffices.
    return torch.load(path, map_location="cpu", weights_only=True)

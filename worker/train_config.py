"""What the trainer is given: the train-job request as the trainer's config (hdm_core/train/config.py writes it
as TOML), the ``torchrun -m hdm_core.train`` command line and its environment. No database, no processes here."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.settings import get_settings
from hdm_core.config import is_pixel_space


def trainer_config(req: dict[str, Any], codec: str | None) -> dict[str, Any]:
    settings = get_settings()
    model: dict[str, Any] = {
        "gradient_checkpointing": any(s.get("grad_checkpointing") for s in req["stages"])
    }
    if req.get("base_model_path"):
        model["init_from"] = req["base_model_path"]
    elif isinstance(req.get("arch"), dict):
        model["arch"] = req["arch"]
    else:
        model["preset"] = req.get("arch") or "xut-small"
    # codec: the base checkpoint's ("pixel" | "vae" | "none" | None), or the architecture's
    if req.get("base_model_path"):
        pixel = codec == "pixel" or (req.get("base_arch") or {}).get("in_channels") == 3
    else:
        pixel = is_pixel_space(model.get("arch") or model.get("preset"))
    codec_section: dict[str, Any] = {"kind": "pixel" if pixel else "vae"}
    if not pixel and not (req.get("base_model_path") and codec == "vae") and settings.vae is not None:
        codec_section["path"] = str(
            settings.vae
        )  # the base's own VAE wins: its latent space is what it learned
    stages = [
        {
            k: s.get(k)
            for k in (
                "resolution",
                "batch_size",
                "lr",
                "steps",
                "epochs",
                "grad_accum",
                "tread_rate",
                "caption_dropout",
                "warmup_steps",
            )
        }
        for s in req["stages"]
    ]
    train: dict[str, Any] = {
        "precision": req.get("precision", "auto"),
        "checkpoint_every": req.get("checkpoint_every", 1000),
        "keep_last_n": req.get("keep_last_n", 3),
        "device": "cpu" if settings.device.startswith("cpu") else "cuda",
        "dist_timeout_s": settings.dist_timeout_s,
    }
    if settings.cpu_threads > 0:
        train["num_threads"] = settings.cpu_threads
    adapter = None
    if req.get(
        "adapter"
    ):  # [adapter]: the trainer's AdapterSection; the file names the registered base model
        section = {**req["adapter"], "base_name": req.get("base_model_name")}
        adapter = {k: v for k, v in section.items() if v is not None}
    return {
        **({"adapter": adapter} if adapter else {}),
        "seed": req.get("seed", 0),
        "model": model,
        "text_encoder": {
            "path": str(settings.text_encoder or ""),
            "max_length": int(req.get("text_max_length", 256)),
        },
        "data": {"path": req["dataset_path"]},
        "cache": {k: bool((req.get("cache") or {}).get(k)) for k in ("latents", "text")},
        "codec": codec_section,
        "objective": {
            "t_logit_mean": req.get("t_logit_mean", 0.0),
            "t_logit_std": req.get("t_logit_std", 1.0),
        },
        "train": train,
        "sampling": {"every": req.get("sample_every", 0), "prompts": req.get("sample_prompts", [])},
        "stages": stages,
    }


@dataclass(frozen=True)
class Rendezvous:
    """One node's part of a multi-node torchrun job (c10d rendezvous, docs/deployment.md). c10d assigns the ranks
    in the order the nodes join; ``node_rank`` names the part (its slots) and which node hosts the store."""

    nnodes: int
    node_rank: int
    endpoint: str  # node 0's HDM_NODE_ADDR:port
    run_id: str  # new for every attempt: a resumed job must not meet the agents of the one before
    local_addr: str  # this machine's HDM_NODE_ADDR
    join_timeout_s: float

    def args(self) -> list[str]:
        # is_host: node 0 serves the store itself; torch would guess it from the host name, which need not resolve
        # to the address the other nodes use
        conf = f"is_host={str(self.node_rank == 0).lower()},join_timeout={int(self.join_timeout_s)}"
        return [
            f"--nnodes={self.nnodes}",
            f"--node-rank={self.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
            f"--rdzv-conf={conf}",
            f"--local-addr={self.local_addr}",
            "--max-restarts=0",
        ]


def command(
    config: Path, run_dir: Path, nproc: int, resume: bool, rdzv: Rendezvous | None = None
) -> list[str]:
    settings = get_settings()
    if settings.train_command:
        cmd = shlex.split(
            settings.train_command.format(config=config, run_dir=run_dir, nproc=nproc, python=sys.executable)
        )
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *(rdzv.args() if rdzv else ["--standalone"]),
            f"--nproc_per_node={nproc}",
            "-m",
            "hdm_core.train",
            str(config),
            "--run-dir",
            str(run_dir),
        ]
    return [*cmd, "--resume"] if resume else cmd


def trainer_env(slots: list[int], environ: dict[str, str]) -> dict[str, str]:
    """The trainer's environment, the one rule for every layout (docs/deployment.md):

    - CPU slots (tests, CPU boxes): no CUDA variables; torchrun runs one process per leased slot.
    - The trainer service (``hdm worker --trainer``, no ``HDM_GPU_INDEX``, sees all GPUs of its machine):
      ``CUDA_VISIBLE_DEVICES`` = the leased slots' local GPU indices (position in ``HDM_LOCAL_SLOTS``), so torchrun's
      ranks use exactly the GPUs leased to the job; image workers stay off them through the leases.
    - A worker pinned to one GPU (``HDM_GPU_INDEX``; compose gives its container one device): it keeps the one
      GPU it sees and can only run 1-slot jobs; a multi-GPU job there is a deployment error, reported as such."""
    settings = get_settings()
    env = dict(environ)
    if not settings.device.startswith("cuda") or not slots:
        return env
    if settings.gpu_index is not None:
        if len(slots) > 1:
            raise RuntimeError(
                f"this worker sees one GPU (slot {settings.gpu_index}) but the job leased slots "
                f"{slots}: run the trainer service (hdm worker --trainer, all GPUs visible) for "
                "multi-GPU train jobs"
            )
        return env
    local = settings.local_slot_list
    missing = [s for s in slots if s not in local]
    if missing:
        raise RuntimeError(f"slots {missing} are not on this trainer's machine (HDM_LOCAL_SLOTS={local})")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(local.index(s)) for s in slots)
    return env

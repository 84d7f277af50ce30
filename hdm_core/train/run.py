"""`run_training`: one call trains one run (every rank calls it under torchrun; rank 0 writes the files).

    python -m hdm_core.train CONFIG.toml --run-dir DIR [--resume] [--max-steps N]
    torchrun --nproc_per_node 4 -m hdm_core.train CONFIG.toml --run-dir DIR          # one machine, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id RUN \\
        -m hdm_core.train CONFIG.toml --run-dir DIR                                    # on each of 2 machines
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from hdm_core.train import distributed
from hdm_core.train.config import TrainConfig, load_config
from hdm_core.train.loop import Trainer, TrainingResult
from hdm_core.train.run_dir import RunDir

logger = logging.getLogger("hdm_core.train")


class TrainingTerminated(BaseException):
    """SIGTERM stopped the run: after a snapshot at the step it was in, or at once on a second SIGTERM."""


@contextlib.contextmanager
def _sigterm_stops(stopped: threading.Event) -> Iterator[None]:
    """While training, a first SIGTERM sets `stopped`: the loop writes a snapshot after the step it is in and
    returns (every rank agrees through Trainer._should_stop), so a preempted or cancelled run loses no step. A
    second SIGTERM raises TrainingTerminated at once. Signal handlers exist on the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if stopped.is_set():
            raise TrainingTerminated(f"signal {signum} (second)")
        stopped.set()
        logger.warning("SIGTERM: stopping after a snapshot at the current step")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_training(
    config: TrainConfig | str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_check: Callable[[], bool] | None = None,
    max_steps: int | None = None,
) -> TrainingResult:
    """Train per `config` into `run_dir` (metrics.jsonl, checkpoints/, samples/, final.safetensors).

    resume: continue from the newest valid snapshot in run_dir (exactly: same data, noise and loss sequence).
    stop_check: polled after every optimizer step; when it returns True a snapshot is written and the call
    returns (finished=False). max_steps: stop (with a snapshot) once this many optimizer steps are done in total.
    Under torchrun every rank calls this; rank 0 writes the files.
    """
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    folder = RunDir(run_dir, keep_last_n=cfg.train.keep_last_n)
    info, created_pg = distributed.setup_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    try:
        torch.set_float32_matmul_precision(cfg.train.matmul_precision)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        if info.is_main:
            folder.start(cfg, resume=resume)
        distributed.barrier(info)  # rank 0 has checked and prepared the run folder
        stopped = threading.Event()

        def stop() -> bool:
            return stopped.is_set() or (stop_check is not None and bool(stop_check()))

        with _sigterm_stops(stopped):
            trainer = Trainer(cfg, folder, info, stop, max_steps)
            if resume:
                trainer.resume()
            result = trainer.run()
        if created_pg and dist.is_initialized():
            # Every rank finished normally: wait for rank 0's last writes before tearing gloo/NCCL down, so no rank
            # destroys the group while another still uses it (seen as a rank aborting at exit).
            dist.barrier()
        if stopped.is_set() and not result.finished:
            raise TrainingTerminated(f"SIGTERM: stopped at step {result.step}, snapshot {result.checkpoint}")
        return result
    finally:
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()

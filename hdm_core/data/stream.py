"""The stage's global sample stream: which image and which per-sample seed every micro-batch slot reads.

Every random choice of a sample (crop offset, caption dropout/shuffle, and in the trainer its noise, t and TREAD
route) is drawn from a seed derived from the run seed, the stage and the sample's position in this stream, so the
data a step sees does not depend on the number of DataLoader workers, on the number of ranks, or on a resume.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class StreamLayout:
    """How optimizer steps map onto the stage's global sample stream.

    Step s consumes global positions [s*G, (s+1)*G) with G = micro_batch * grad_accum * world_size. Micro-step k on
    rank r reads slot j = k * world_size + r, i.e. positions s*G + j*micro_batch + [0, micro_batch). A single process
    with grad_accum = W therefore sees the same micro-batches as W ranks with grad_accum = 1.
    """

    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def slot_start(self, step: int, micro: int, rank: int) -> int:
        return step * self.global_batch + (micro * self.world_size + rank) * self.micro_batch


class StageSampler(Sampler[tuple[int, int]]):
    """Infinite, resumable, DistributedSampler-style stream of `(image_index, sample_seed)` for one rank.

    Epoch e is a permutation seeded by (seed, stage, e); the stream is the concatenation of epochs. Starting at
    `start_step` reproduces exactly what an uninterrupted run would have read from that step on.
    """

    def __init__(
        self,
        num_samples: int,
        layout: StreamLayout,
        *,
        rank: int,
        seed: int,
        stage: int,
        start_step: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not 0 <= rank < layout.world_size:
            raise ValueError(f"rank {rank} outside world of {layout.world_size}")
        self.num_samples = num_samples
        self.layout = layout
        self.rank = rank
        self.seed = seed
        self.stage = stage
        self.start_step = start_step
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm: list[int] = []

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.stage, "epoch", epoch))
            self._perm = torch.randperm(self.num_samples, generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm[offset]

    def sample_seed(self, position: int) -> int:
        return mix_seed(self.seed, self.stage, "sample", position)

    def positions(self) -> Iterator[int]:
        lay = self.layout
        step = self.start_step
        while True:
            for micro in range(lay.grad_accum):
                start = lay.slot_start(step, micro, self.rank)
                yield from range(start, start + lay.micro_batch)
            step += 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for pos in self.positions():
            yield self.index_at(pos), self.sample_seed(pos)

"""A weighted mixture of datasets for step-based training on one process or many.

`EpochIndex` draws, per epoch, a global index in which source s has a quota proportional to its
weight (a permutation of its items, repeated when it is over-sampled, truncated when under-sampled),
shuffles it with a generator seeded by (seed, epoch), drops the tail that does not fill a batch on
every rank, and gives rank r every W-th position. Each position of the epoch is therefore read by
exactly one rank (with weights proportional to size it is a permutation: ranks see disjoint tiles).
The index is a pure function of (seed, epoch), so a resumed run continues exactly where it stopped:
`batches(start)` starts at any global micro-batch number.

Set HISTODIFFUSION_RECORD_IDS=1 to have the training stages write the ids each rank read to
<run>/debug/ids_rank<r>.txt (for audits and the multi-process test).
"""
from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset

from ..runtime.errors import HistoError

RECORD_IDS_ENV = "HISTODIFFUSION_RECORD_IDS"


def normalise_weights(sizes: Sequence[int], weights: Sequence[float], names: Sequence[str]) -> list[float]:
    if not weights:
        weights = [float(n) for n in sizes]
    if len(weights) != len(sizes):
        raise HistoError(f"{len(weights)} weight(s) given for {len(sizes)} source(s) {list(names)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise HistoError(f"source weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [w / total for w in weights]


class EpochIndex:
    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int, rank: int = 0,
                 world: int = 1, seed: int = 0, names: Sequence[str] = ()):
        self.sizes = [int(n) for n in sizes]
        names = list(names) or [f"source{i}" for i in range(len(sizes))]
        empty = [n for n, s in zip(names, self.sizes) if s == 0]
        if empty:
            raise HistoError(f"empty source(s): {empty}")
        self.probs = normalise_weights(self.sizes, weights, names)
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.epoch_size = self.offsets[-1]
        self.quotas = [int(round(p * self.epoch_size)) for p in self.probs]
        self.batch_size, self.rank, self.world, self.seed = int(batch_size), int(rank), int(world), int(seed)
        self.batches_per_epoch = sum(self.quotas) // (self.batch_size * self.world)
        if self.batches_per_epoch < 1:
            raise HistoError(f"{sum(self.quotas)} items in {names} do not fill one batch of {self.batch_size} "
                             f"on each of {self.world} process(es): lower batch_size")

    def epoch(self, epoch: int) -> list[int]:
        """This rank's global indices for `epoch` (batches_per_epoch * batch_size of them)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        parts = []
        for s, (n, q) in enumerate(zip(self.sizes, self.quotas)):
            reps = -(-q // n) if q else 0
            idx = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:q] if reps else torch.empty(0, dtype=torch.long)
            parts.append(idx + self.offsets[s])
        full = torch.cat(parts)
        full = full[torch.randperm(len(full), generator=g)]
        full = full[: self.batches_per_epoch * self.batch_size * self.world]
        return full[self.rank::self.world].tolist()

    def batches(self, start: int = 0) -> Iterator[list[tuple[int, int]]]:
        """Endless batches of (global index, epoch) from global micro-batch number `start` on."""
        epoch, offset = divmod(int(start), self.batches_per_epoch)
        while True:
            idx = self.epoch(epoch)
            for b in range(offset, self.batches_per_epoch):
                yield [(i, epoch) for i in idx[b * self.batch_size:(b + 1) * self.batch_size]]
            epoch, offset = epoch + 1, 0


class MixtureDataset(Dataset):
    """Concatenation of datasets returning (x, source index, "<source name>:<id>") for a key
    (global index, epoch); sources with `set_epoch` (latent caches) get the epoch first, so the z
    sampled from (mean, std) differs per epoch but is reproducible."""

    def __init__(self, sources: Sequence[Dataset], names: Sequence[str]):
        self.sources, self.names = list(sources), list(names)
        self.offsets = [0]
        for s in self.sources:
            self.offsets.append(self.offsets[-1] + len(s))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        s = bisect.bisect_right(self.offsets, i) - 1
        src = self.sources[s]
        if hasattr(src, "set_epoch"):
            src.set_epoch(epoch)
        item = src[i - self.offsets[s]]
        return item[0], s, f"{self.names[s]}:{item[-1]}"


def collate(items):
    return torch.stack([x for x, _, _ in items]), torch.tensor([s for _, s, _ in items]), [i for _, _, i in items]


def make_loader(dataset: MixtureDataset, index: EpochIndex, start: int, num_workers: int = 0):
    """Endless iterator of (x, source, ids) batches for this rank from micro-batch `start` on."""
    from torch.utils.data import DataLoader

    # its own generator: creating the iterator must not draw from the global RNG, whose state a
    # checkpoint restores (else a resumed run's noise would be shifted by one draw)
    return iter(DataLoader(dataset, batch_sampler=index.batches(start), collate_fn=collate,
                           num_workers=num_workers, generator=torch.Generator().manual_seed(start)))


class IdRecorder:
    """Appends the ids this rank read to <run>/debug/ids_rank<r>.txt when HISTODIFFUSION_RECORD_IDS=1."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.path = Path(run_dir) / "debug" / f"ids_rank{rank}.txt" if os.environ.get(RECORD_IDS_ENV) == "1" else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, step: int, ids: Sequence[str]) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(f"{step}\t{i}\n" for i in ids)

"""torch Datasets over the on-disk artifacts: pixel shards of a dataset, and the latent cache.

Both read their safetensors shards lazily (memory-mapped via `safe_open`), so memory does not grow
with the size of the corpus. Each item carries its manifest id, so ranks and runs can be audited.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from ..core.seeds import torch_generator
from ..runtime.artifacts import (INDEX, INDEX_COLUMNS, SHARDS_DIR, latent_shard_name, pixel_shard_name, read_dataset,
                                 read_meta, subset_ids)
from ..runtime.errors import HistoError
from ..runtime.fileio import read_csv


class _ShardReader:
    """Opens safetensors shards on first use (per process / worker) and reads single rows."""

    def __init__(self, paths: dict[int, Path]):
        self.paths = paths
        self._open: dict[int, object] = {}

    def __getstate__(self):  # handles are not picklable: re-open in each worker
        return {"paths": self.paths, "_open": {}}

    def row(self, shard: int, index: int, key: str) -> torch.Tensor:
        f = self._open.get(shard)
        if f is None:
            path = self.paths[shard]
            try:
                f = safe_open(str(path), framework="pt")
            except Exception as e:
                raise HistoError(f"cannot read shard {path}: {e}") from None
            self._open[shard] = f
        return f.get_slice(key)[index:index + 1][0]


class PixelDataset(Dataset):
    """Tiles of a prepared dataset: (image float [3,H,W] in [-1, 1], label index or -1, id).
    `labeled_only`: leave out the cohort's unlabeled tiles (label "") of the selection."""

    def __init__(self, directory: str | Path, subset: str = "all", ids: list[str] | None = None,
                 labeled_only: bool = False):
        self.directory = Path(directory)
        self.meta, self.all_rows = read_dataset(self.directory)  # all_rows: the whole manifest
        rows = self.all_rows
        self.classes: list[str] = list(self.meta.get("classes") or [])
        wanted = set(ids if ids is not None else subset_ids(self.directory, rows, subset))
        self.rows = [r for r in rows if r["id"] in wanted and (r["label"] or not labeled_only)]
        if not self.rows:
            raise HistoError(f"no tiles selected from {self.directory} (subset {subset!r})")
        shards = {int(r["shard"]) for r in self.rows}
        self.reader = _ShardReader({s: self.directory / SHARDS_DIR / pixel_shard_name(s) for s in shards})
        self.class_index = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.rows)

    def label_index(self, i: int) -> int:
        return self.class_index.get(self.rows[i]["label"], -1)

    def uint8(self, i: int) -> torch.Tensor:
        r = self.rows[i]
        return self.reader.row(int(r["shard"]), int(r["index"]), "images")  # [H, W, 3] uint8

    def __getitem__(self, i: int):
        img = self.uint8(i).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return img, self.label_index(i), self.rows[i]["id"]


def cache_pixels(data: str | Path, ids: list[str], what: str, flag: str) -> PixelDataset:
    """The tiles `ids` of prepared dataset `data` (the pixels behind a latent cache's rows), checked up front:
    a dataset that is not readable, or one that lacks some of the ids, is one clear error naming it and the
    option (`flag`) that gives another."""
    data = Path(data)
    if not (data / "manifest.csv").is_file():
        raise HistoError(f"{what}: dataset {data} is not readable (no manifest.csv): give {flag}, the prepared "
                         f"dataset the latent cache was encoded from")
    ds = PixelDataset(data, ids=ids)
    if len(ds) != len(set(ids)):
        raise HistoError(f"{what}: {len(set(ids)) - len(ds)} tile(s) of the latents are not in dataset {data}: "
                         f"give {flag}, the dataset the cache was encoded from")
    return ds


class LatentDataset(Dataset):
    """Latents of a cache: z = (mean + std * noise) * scaling_factor, sampled at load time.

    Returns (z float [C,h,w], label index or -1, id). `sample=False` returns the scaled mean.
    """

    def __init__(self, directory: str | Path, subset: str = "all", sample: bool = True, seed: int = 0):
        self.directory = Path(directory)
        self.meta = read_meta(self.directory, "latent cache")
        rows = read_csv(self.directory / INDEX, INDEX_COLUMNS, "latent index")
        self.classes: list[str] = list(self.meta.get("classes") or [])
        wanted = set(subset_ids(self.directory, rows, subset))
        self.rows = [r for r in rows if r["id"] in wanted]
        if not self.rows:
            raise HistoError(f"no latents selected from {self.directory} (subset {subset!r})")
        from ..runtime.latent_space import of_cache

        self.space = of_cache(self.directory)
        self.scaling_factor = self.space.scaling_factor
        shards = {int(r["shard"]) for r in self.rows}
        self.reader = _ShardReader({s: self.directory / latent_shard_name(s) for s in shards})
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.sample = sample
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Noise for z depends on (seed, epoch, item): reproducible, different every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def labels(self) -> np.ndarray:
        return np.array([self.class_index.get(r["label"], -1) for r in self.rows])

    def __getitem__(self, i: int):
        r = self.rows[i]
        mean = self.reader.row(int(r["shard"]), int(r["index"]), "mean").float()
        if self.sample:
            std = self.reader.row(int(r["shard"]), int(r["index"]), "std").float()
            g = torch_generator(self.seed, self.epoch, i)
            mean = mean + std * torch.randn(mean.shape, generator=g)
        return mean * self.scaling_factor, self.class_index.get(r["label"], -1), r["id"]

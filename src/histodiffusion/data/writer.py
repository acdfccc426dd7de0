"""Streaming writer of a dataset directory (the `prepare` artifact; see artifacts.py).

Tiles are appended one at a time and flushed to a pixel shard every `shard_size` tiles, so memory
does not grow with the number of tiles. Everything is written into a temporary directory that is
renamed over the destination only by `finish()`, after the completion marker: a killed run leaves
no half-written dataset that a later stage could read as complete.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from ..artifacts import MANIFEST, MANIFEST_COLUMNS, META, SHARDS_DIR, SUBSETS_DIR, format_meta, pixel_shard_name
from ..runtime import HistoError, mark_complete, write_csv_atomic, write_json_atomic


def tile_hash(tile: np.ndarray) -> str:
    """Content hash of a tile's pixels (used by the leakage guard)."""
    return hashlib.sha1(np.ascontiguousarray(tile).tobytes()).hexdigest()


class DatasetWriter:
    def __init__(self, out: str | os.PathLike, tile_size: int, shard_size: int = 1024):
        from safetensors.numpy import save_file  # noqa: F401  (fail early if missing)

        self.out = Path(out)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        (self.tmp / SHARDS_DIR).mkdir(parents=True)
        self.tile_size = tile_size
        self.shard_size = shard_size
        self.rows: list[dict] = []
        self._buf: list[np.ndarray] = []
        self._shard = 0

    def add(self, tile: np.ndarray, *, id: str, source: str, path: str = "", x: int = 0, y: int = 0,
            width: int = 0, height: int = 0, label: str = "", group: str = "", split: str = "") -> dict:
        """Append one uint8 [H, W, 3] tile at the working resolution; returns its manifest row."""
        if tile.dtype != np.uint8 or tile.shape != (self.tile_size, self.tile_size, 3):
            raise HistoError(f"tile {id}: expected uint8 {(self.tile_size, self.tile_size, 3)}, "
                             f"got {tile.dtype} {tile.shape}")
        row = {"id": id, "source": source, "path": path, "x": x, "y": y, "width": width, "height": height,
               "label": label, "group": group or id, "split": split, "shard": self._shard,
               "index": len(self._buf), "hash": tile_hash(tile)}
        self._buf.append(tile)
        self.rows.append(row)
        if len(self._buf) >= self.shard_size:
            self._flush()
        return row

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        if not self._buf:
            return
        path = self.tmp / SHARDS_DIR / pixel_shard_name(self._shard)
        save_file({"images": np.stack(self._buf)}, str(path),
                  metadata={"format_version": str(format_meta()["format_version"])})
        self._buf = []
        self._shard += 1

    def finish(self, meta: dict, subsets: dict[str, list[str]] | None = None) -> Path:
        """Write the manifest, subsets and meta.json, mark complete, and rename into place.

        `rows` may have been edited (e.g. split assignment) between add() and finish().
        """
        self._flush()
        if not self.rows:
            self.abort()
            raise HistoError(f"no tiles to write to {self.out}")
        write_csv_atomic(self.tmp / MANIFEST, self.rows, MANIFEST_COLUMNS)
        for name, ids in (subsets or {}).items():
            write_csv_atomic(self.tmp / SUBSETS_DIR / f"{name}.csv", ({"id": i} for i in ids), ["id"])
        write_json_atomic(self.tmp / META, format_meta(**meta))
        mark_complete(self.tmp, count=len(self.rows))
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

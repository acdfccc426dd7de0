"""Atomic writes (a temporary beside the target, renamed over it), JSON/CSV readers that name the file in
their errors, and content hashes. No torch."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .errors import HistoError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it.

    Works for files and for directories (the caller creates what it likes at the yielded path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    remove_path(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            remove_path(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def remove_path(p: Path) -> None:
    """Delete a file, link or folder if it is there."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_csv_atomic(path: str | os.PathLike, rows: Iterable[dict], fieldnames: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="raise")
            w.writeheader()
            for r in rows:
                w.writerow(r)
            f.flush()
            os.fsync(f.fileno())


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise HistoError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HistoError(f"{what} is not valid JSON: {path} ({e})") from None


def read_csv(path: str | os.PathLike, required: Sequence[str] = (), what: str = "CSV file") -> list[dict]:
    """Read a CSV into dicts; raise a HistoError naming the file when it or a needed column is missing."""
    path = Path(path)
    if not path.is_file():
        raise HistoError(f"{what} not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in required if c not in cols]
        if missing:
            raise HistoError(f"{what} {path} lacks column(s) {missing}; it has {cols}")
        return list(reader)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike, pattern: str = "*.safetensors") -> str:
    """Content hash of a model folder: its weight files, in name order (names excluded)."""
    path = Path(path)
    files = sorted(path.rglob(pattern))
    if not files:
        raise HistoError(f"no {pattern} files in model folder {path}")
    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(f).encode())
    return h.hexdigest()


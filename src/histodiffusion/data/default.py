"""The built-in default data (package data under histodiffusion/default_data/, see SOURCES.md there).

unlabeled/: the five unlabeled H&E images of ../shared/data/unlabeled_he (the large PNG re-encoded as
JPEG); lung/: a grouped subset of LC25000 lung (whole groups, 64x64 px) with labels.csv
(path,label,group_id). bench/make_default_data.py regenerates both from ../shared/data.
"""
from __future__ import annotations

from pathlib import Path

from ..runtime.errors import HistoError
from .slides import is_image_file

ROOT = Path(__file__).resolve().parents[1] / "default_data"


def _check(path: Path) -> Path:
    if not path.exists():
        raise HistoError(f"built-in default data missing: {path} (reinstall histodiffusion)")
    return path


def unlabeled_dir() -> Path:
    return _check(ROOT / "unlabeled")


def unlabeled_sources() -> list[Path]:
    """The default unlabeled source images, sorted by name."""
    return sorted(p for p in unlabeled_dir().iterdir() if p.is_file() and is_image_file(p))


def labels_csv() -> Path:
    """labels.csv of the default labeled target subset (paths relative to it)."""
    return _check(ROOT / "lung" / "labels.csv")

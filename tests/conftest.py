"""Shared test fixtures: offline, small thread count, paths to the shared real data."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTODIFFUSION_SHARED", REPO.parent / "shared" / "data"))
LUNG = SHARED / "lc25000_lung"
UNLABELED = SHARED / "unlabeled_he"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or a clean skip saying why."""
    if not (LUNG / "labels.csv").is_file() or not UNLABELED.is_dir():
        pytest.skip(f"needs the real data in {SHARED} (absent on this machine)")
    return SHARED


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread in every test: like the CLI subprocesses and torchrun workers the tests start
    (OMP_NUM_THREADS=1), so in-process and subprocess results are bit-identical, and two cores are not
    oversubscribed."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def warnings_logged():
    """Messages of the warnings the package logs, as a list (the `histodiffusion` logger does not
    propagate to the root logger, so pytest's caplog does not see them)."""
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    keep = Keep()
    logger = logging.getLogger("histodiffusion")
    logger.addHandler(keep)
    yield keep.messages
    logger.removeHandler(keep)

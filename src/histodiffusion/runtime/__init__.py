"""Run-time plumbing every stage shares; no stage knowledge beyond the records below, no torch at import.

    errors.py        HistoError, the one error type for users (the CLI prints it and exits 2)
    fileio.py        atomic writes, JSON/CSV readers that name the file, content hashes
    log.py           loggers under histodiffusion.<stage>, the run's log.txt, metrics.jsonl, progress
    progresslog.py   progress lines of long loops (tqdm on a terminal, plain lines elsewhere)
    distributed.py   accelerate set-up, seeding, collective error checks, resumable checkpoints
    rundirs.py       run directories: config.json first, _COMPLETE.json last
    contract.py      the completion contract: _COMPLETE.json records the config and input hashes
    artifacts.py     artifact file names, schemas and format versions
    latent_space.py  the latent-space record (autoencoder hash, scaling factor, latent shape, schedule)
    layout.py        RunLayout: every path of a run directory
    config.py        one frozen config dataclass per stage (configtypes.py: the fields' machinery,
                     configrules.py: the value rules checked at plan time); presets.py: named presets
    registry.py      the stage registry: one record per stage (name, config, run, outputs)

Import what you need from its module; the package re-exports only the error type and the loggers.
"""
from .errors import HistoError
from .log import get_logger, set_logging

__all__ = ["HistoError", "get_logger", "set_logging"]

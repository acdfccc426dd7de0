"""Logging and timings of `run`: loggers under histodiffusion.<stage> (the run's log.txt gets every
stage's lines, each stage directory its own, no handler swapped), and a re-run keeps the measured time
of the stages it skips."""
import logging
import re

from histodiffusion.pipeline import run
from histodiffusion.runtime.config import RunConfig
from histodiffusion.runtime.log import closes_stage_logs, get_logger, log_to


@closes_stage_logs
def _stage(name: str, out, message: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    get_logger(name, out / "log.txt").info(message)
    get_logger(name).info(f"{message} (helper)")  # another call without a file keeps the stage's file


def _stage_files() -> list:
    return [h for n in list(logging.root.manager.loggerDict) if n.startswith("histodiffusion.")
            for h in logging.getLogger(n).handlers if isinstance(h, logging.FileHandler)]


def test_run_log_gets_every_stage_and_each_stage_dir_its_own(tmp_path):
    run_log = tmp_path / "log.txt"
    log = get_logger("run")
    with log_to(run_log):
        log.info("[1/3] sample -> samples")
        _stage("sample", tmp_path / "samples", "sampled 6 images")
        log.info("[1/3] sample: done")  # the pipeline's lines go on after a stage with its own file
        _stage("select", tmp_path / "samples_nopretrain", "kept 4 of 6")
        _stage("sample", tmp_path / "samples_nopretrain", "sampled 2 images")  # the same stage again
        log.info("finished; report: x")
    get_logger("run").info("after the run: not in its log")
    text = run_log.read_text()
    for line in ("[run] [1/3] sample -> samples", "[sample] sampled 6 images", "[run] [1/3] sample: done",
                 "[select] kept 4 of 6", "[sample] sampled 2 images", "[run] finished; report: x"):
        assert line in text, text
    assert "after the run" not in text
    first = (tmp_path / "samples" / "log.txt").read_text()
    assert "sampled 6 images" in first and "sampled 6 images (helper)" in first
    assert "sample: done" not in first and "sampled 2 images" not in first and "kept" not in first
    second = (tmp_path / "samples_nopretrain" / "log.txt").read_text()
    assert "kept 4 of 6" in second and "sampled 2 images" in second and "sampled 6" not in second
    assert not _stage_files()  # stage log files are closed when the stage returns


def test_stage_log_closed_when_the_stage_fails(tmp_path):
    @closes_stage_logs
    def failing(out):
        out.mkdir()
        get_logger("evaluate", out / "log.txt").info("started")
        raise RuntimeError("boom")

    try:
        failing(tmp_path / "e")
    except RuntimeError:
        pass
    assert not _stage_files()
    assert "started" in (tmp_path / "e" / "log.txt").read_text()


def _rows(timings: str) -> dict[str, tuple[str, str]]:
    return {c[0]: (c[1], c[2]) for c in (re.split(r"\s*\|\s*", ln.strip("| ")) for ln in timings.splitlines()[2:])}


def test_rerun_keeps_the_measured_time_of_skipped_stages_and_logs_each_stage(tmp_path):
    cfg = RunConfig(out=str(tmp_path / "r"), base="none", until="prepare")
    root = tmp_path / "r"
    run(cfg)
    first = _rows((root / "timings.md").read_text())
    assert set(first) == {"prepare unlabeled", "prepare target"}
    assert all(status == "ran" and float(sec) > 0 for sec, status in first.values()), first
    run(cfg)
    again = _rows((root / "timings.md").read_text())
    for name, (sec, status) in again.items():
        assert sec == first[name][0] and status.startswith("skipped"), again  # not "0.0 skipped"
    # the run's log holds the pipeline's and every stage's lines; each dataset its own stage log
    text = (root / "log.txt").read_text()
    assert "[run] [1/2] prepare unlabeled ->" in text and "[run] [2/2] prepare target: done" in text
    assert "[prepare] prepared unlabeled dataset" in text and "[prepare] prepared labeled dataset" in text
    assert text.count("complete, skipped") == 2
    target_log = (root / "data" / "target" / "log.txt").read_text()
    assert "prepared labeled dataset" in target_log and "prepared unlabeled" not in target_log
    assert "prepared unlabeled dataset" in (root / "data" / "unlabeled" / "log.txt").read_text()

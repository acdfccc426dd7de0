"""Logs a person can read: plain progress lines (no carriage returns) wherever output is not a terminal,
a progress bar on a terminal, --quiet and --verbose."""
import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from helpers_pretrain import make_cache
from histodiffusion.runtime.errors import HistoError
from histodiffusion.runtime.log import get_logger
from histodiffusion.runtime.progresslog import LogConfig, Progress, apply_log_config, progress_line

PRETRAIN = ["--block-out-channels", "16,32", "--layers-per-block", "1", "--batch-size", "4", "--warmup", "2",
            "--sample-every", "0", "--steps", "20", "--checkpoint-every", "10", "--attention", "false"]
LINE = re.compile(r"pretrain: (\d+)/20 \((\d+)%\), loss=\d\.\d{4}, [\d.]+ (it/s|s/it), elapsed \w+(, ETA \w+)?$")


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _pretrain(tmp_path, name: str, *flags, tty: bool = False) -> tuple[str, str]:
    """`histodiffusion [flags] pretrain ...` with stderr to a file (or a pseudo-terminal): (stderr, log.txt)."""
    cache = tmp_path / "cache" / "a"
    if not cache.exists():
        make_cache(tmp_path, "a", n=16)
    out = tmp_path / name
    cmd = [sys.executable, "-m", "histodiffusion", *flags, "pretrain", "--cache", str(cache), "--out", str(out),
           *PRETRAIN]
    if tty:
        main, child = pty.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=child)
        os.close(child)
        chunks = []
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        os.close(main)
        assert proc.wait(timeout=300) == 0, b"".join(chunks)[-2000:]
        err = b"".join(chunks).decode(errors="replace")
    else:
        with open(tmp_path / f"{name}.stderr", "w") as f:
            r = subprocess.run(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=f, timeout=300)
        err = (tmp_path / f"{name}.stderr").read_text()
        assert r.returncode == 0, err[-2000:]
    return err, (out / "log.txt").read_text()


def test_non_terminal_output_has_plain_periodic_lines(tmp_path):
    err, log = _pretrain(tmp_path, "plain", "--progress-every", "25")
    for text in (err, log):
        assert "\r" not in text
        lines = [m for m in map(LINE.search, text.splitlines()) if m]
        assert [int(m.group(1)) for m in lines] == [5, 10, 15, 20]  # every 25% of 20 steps
        assert all(m.group(4) for m in lines[:-1]) and not lines[-1].group(4)  # an ETA until the end
    assert " INFO pretrain: " in err


def test_terminal_gets_a_bar_and_the_log_file_plain_lines(tmp_path):
    err, log = _pretrain(tmp_path, "tty", tty=True)
    assert "20/20 [" in err and "\r" in err.replace("\r\n", "\n")  # tqdm's bar on the terminal, not plain lines
    assert not any(LINE.search(line) for line in err.replace("\r", "\n").splitlines())
    assert "\r" not in log
    assert [int(m.group(1)) for m in map(LINE.search, log.splitlines()) if m] == list(range(2, 21, 2))


def test_quiet_prints_nothing_but_warnings(tmp_path):
    err, log = _pretrain(tmp_path, "quiet", "--quiet")
    assert not re.search(r"\b(INFO|DEBUG)\b", err) and "pretrain: " not in err and "\r" not in err
    assert "pretrain finished" in log and len([x for x in log.splitlines() if LINE.search(x)]) == 10


def test_progress_lines_and_verbosity_in_process():
    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.lines: list[tuple[int, str]] = []

        def emit(self, record):
            self.lines.append((record.levelno, record.getMessage()))

    keep = Keep()
    log = get_logger("progress-test")
    log.addHandler(keep)
    try:
        for _ in Progress(range(7), desc="loop", log=log, every=50):  # 50% of 7 steps: a line every 4 steps
            pass
        assert [m for _, m in keep.lines][0].startswith("loop: 4/7 (57%), ")
        assert [m.split(",")[0] for _, m in keep.lines] == ["loop: 4/7 (57%)", "loop: 7/7 (100%)"]
        keep.lines.clear()
        for _ in Progress(range(4), desc="inner", log=log, level=logging.DEBUG, every=50):
            pass
        assert keep.lines == []  # DEBUG lines need --verbose
        apply_log_config(LogConfig(verbose=True))
        for _ in Progress(range(4), desc="inner", log=log, level=logging.DEBUG, every=50):
            pass
        assert [lvl for lvl, _ in keep.lines] == [logging.DEBUG, logging.DEBUG]
    finally:
        apply_log_config(LogConfig())
        log.removeHandler(keep)
    with pytest.raises(HistoError, match="exclude each other"):
        apply_log_config(LogConfig(quiet=True, verbose=True))
    assert progress_line("x", 30, 120, 2.0, 15.0, "loss=0.5") == "x: 30/120 (25%), loss=0.5, 2 it/s, elapsed 15s, ETA 45s"
    assert progress_line("x", 3, 3, 0.5, 6.0) == "x: 3/3 (100%), 2 s/it, elapsed 6s"


def test_version_flag_prints_the_package_version():
    from importlib.metadata import version

    import histodiffusion

    r = subprocess.run([sys.executable, "-m", "histodiffusion", "--version"], capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 0 and r.stdout == f"histodiffusion {histodiffusion.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", histodiffusion.__version__)
    assert version("histodiffusion") == histodiffusion.__version__  # the installed metadata: the same one fact


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_launched_worker_exits_with_its_code_and_flushed_output(tmp_path, world):
    """`python -m histodiffusion` ends through exit_process: a worker of a launcher (WORLD_SIZE > 1) skips the
    interpreter's finalization (it can abort there after an optimizer step in a process group) but still
    exits with the command's code, its stdout/stderr and log file flushed."""
    import os
    import subprocess
    import sys

    code = ("import logging, sys\n"
            f"h = logging.FileHandler({str(tmp_path / 'w.log')!r}); logging.getLogger('w').addHandler(h)\n"
            "logging.getLogger('w').warning('logged line')\n"
            "print('printed line'); sys.stderr.write('error line')\n"
            "from histodiffusion.runtime.distributed import exit_process\n"
            "exit_process(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "WORLD_SIZE": world})
    assert r.returncode == 3 and "printed line" in r.stdout and "error line" in r.stderr
    assert (tmp_path / "w.log").read_text().strip() == "logged line"
    # both ways in, the installed `histodiffusion` command and `python -m histodiffusion`, end there
    from importlib.metadata import entry_points
    from pathlib import Path

    import histodiffusion

    assert entry_points(group="console_scripts")["histodiffusion"].value == "histodiffusion.cli:entry"
    main_py = Path(histodiffusion.__file__).with_name("__main__.py").read_text()
    assert "entry()" in main_py

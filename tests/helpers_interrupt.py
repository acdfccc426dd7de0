"""Interrupting a stage at a deterministic point through its public seam, its logger (no monkeypatching)."""
import contextlib
import logging


class InterruptAt(logging.Handler):
    """Raises KeyboardInterrupt when the logger it is attached to logs a line starting with `line`."""

    def __init__(self, line: str):
        super().__init__()
        self.line = line

    def emit(self, record):
        if record.getMessage().startswith(self.line):
            raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_at(logger_name: str, line: str):
    """While the block runs, the stage logging to `logger_name` stops (KeyboardInterrupt) at `line`."""
    logger, stop = logging.getLogger(logger_name), InterruptAt(line)
    logger.addHandler(stop)
    try:
        yield
    finally:
        logger.removeHandler(stop)

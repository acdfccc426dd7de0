"""The one error type for users (the CLI prints its message and exits 2); no dependencies."""
from __future__ import annotations


class HistoError(Exception):
    """An error the user can fix: the CLI prints its message (naming the culprit) and exits 2."""

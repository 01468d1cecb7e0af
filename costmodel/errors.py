"""The one exception type that means "the user asked for something we cannot do"."""

from __future__ import annotations


class CostModelError(Exception):
    """Bad input: an unknown model, method or op, an impossible rank, an untraceable model,
    a broken plugin. The CLI prints its message on one line and exits with status 2."""

"""The rich console the command modules print their tables and verdicts with.

Layer 9 (cli): imports only rich.
"""

from __future__ import annotations

from rich.console import Console


def console() -> Console:
    """A console on the current ``sys.stdout``, no syntax highlighting, long lines wrapped by the terminal."""
    # Made per call so it writes to the sys.stdout of the moment (a pipe, pytest's capture); the engine's console
    # writes training logs to stderr, but these tables are the command's output. soft_wrap: long lines wrap in the
    # terminal, not mid-number.
    return Console(highlight=False, soft_wrap=True)

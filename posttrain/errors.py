"""The errors posttrain raises for bad input, at the bottom of the stack so that every layer can raise them.

Imports nothing from posttrain. Each message says where (file, row, field or config key) and what to change.
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where and why."""


class KernelError(ConfigError):
    """A kernel switch that cannot be honoured here; the message says what to change (the CLI prints it)."""


class DataError(ValueError):
    """Bad input data. The message names the file, the row (1-based) and the field."""

    def __init__(self, file: str | Path, row: int | None, field: str | None, problem: str):
        self.file, self.row, self.field, self.problem = str(file), row, field, problem
        where = str(file)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")


class BadPair(DataError):
    """A well-formed row whose pair cannot teach a preference; ``data.bad_pairs: drop`` counts and skips it."""


class TemplateError(ValueError):
    """A chat template that cannot render a conversation, or cannot mark which tokens the assistant wrote."""

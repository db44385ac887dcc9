"""User-facing errors: each names the place (file, line, field) so a bad input is fixable."""
from __future__ import annotations


class DensehfError(Exception):
    """Base class for errors the user can act on; the CLI prints them without a stack trace."""


class ConfigError(DensehfError):
    """A bad flag, YAML key or value."""


class DataError(DensehfError):
    """A bad data file or row. `where` is 'file', 'file:line' or 'file:line: field'."""

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}")


class ValidationDone(Exception):
    """`--validate_only` finished cleanly: not an error, it ends the stage before any model loads."""

    def __init__(self, report: str, stats: dict):
        self.report = report
        self.stats = stats
        super().__init__(report)

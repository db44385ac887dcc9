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


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the SLURM scripts requeue on it


class Preempted(Exception):
    """A stage stopped for SIGTERM/SIGUSR1 after saving a checkpoint on every rank: not an error."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(f"{signal_name}: stopped after step {step} with a checkpoint in {checkpoint}; "
                         "continue with --resume")

"""User-facing errors.

Every error a user can cause (bad data, bad config, bad arguments) is a ``ZhilingError``; the CLI prints its message
without a traceback and exits non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ZhilingError(Exception):
    """An error caused by user input, with a message that says where and why."""


class ConfigError(ZhilingError):
    """A config file or ``key=value`` override is invalid."""


class DataError(ZhilingError):
    """A data file or one of its rows is invalid.

    ``path`` and ``line`` say where (``line`` is 1-based; ``None`` for file-level problems), ``field`` names the
    offending field when there is one, and ``reason`` says what is wrong.
    """

    def __init__(self, reason: str, path: str | None = None, line: int | None = None, field: str | None = None):
        self.reason = reason
        self.path = path
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.path or "<data>"
        if self.line is not None:
            where += f", line {self.line}"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.reason}"

    def located(self, path: str | None = None, line: int | None = None) -> "DataError":
        """Return a copy of this error with the file and line filled in where they were unknown."""
        return DataError(self.reason, path=self.path or path, line=self.line if self.line is not None else line,
                         field=self.field)


class CheckpointError(ZhilingError):
    """A checkpoint cannot be resumed: settings that differ, files that are damaged or do not fit the model, or a
    file that would run code when loaded."""


class RunStopped(ZhilingError):
    """A run stopped on request (SIGTERM, Ctrl-C) after saving a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        self.exit_code = exit_code
        super().__init__(message)

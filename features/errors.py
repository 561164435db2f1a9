"""A single error type for bad input, rendered as one actionable line."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data or configuration.

    The CLI turns this into one line on stderr and exit code 2; it exists so that every reader
    reports *which* file, column and row was wrong instead of a pandas stack trace.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        column: str | None = None,
        row: int | None = None,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.column = column
        self.row = row
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.path:
            where.append(self.path)
        if self.column:
            where.append(f"column '{self.column}'")
        if self.row is not None:
            where.append(f"row {self.row}")
        prefix = ": ".join([", ".join(where)]) if where else ""
        return f"{prefix}: {self.message}" if prefix else self.message

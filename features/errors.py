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


def one_line(exc: Exception, *, field_prefix: str = "", env_prefix: str | None = None) -> str:
    """The one-line message a user sees for bad input: a DataError's text, or a pydantic
    ValidationError's first error as ``<field>: <message> (+N more)``.

    ``field_prefix`` is put before the field's dotted path; with ``env_prefix`` the field is named
    as the environment variable that set it (``TRACKTOWER_PORT``), for settings read from there.
    """
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or exc.title
        if env_prefix is not None:
            field = env_prefix + ("_".join(str(p) for p in first["loc"]).upper() or "*")
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"{field_prefix}{field}: {first['msg']}{more}"
    return " ".join(str(exc).split())

"""The one exception type that stage scripts turn into a clean exit, and one-line forms of library errors."""

from __future__ import annotations


class PipelineError(Exception):
    """Bad input or a failed check; the message names the file and the field."""


def yaml_problem(err: Exception) -> str:
    """A YAML parse error in one line: where (line and column, 1-based) and what."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{where}{what}"

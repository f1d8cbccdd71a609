"""Data tables in: CSV, JSON (a list of objects), JSONL or Parquet, read by extension into a DataFrame."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lorapipe.errors import PipelineError


def read_table(
    path: Path, encoding: str = "utf-8", encoding_field: str = "encoding", shown_as: str | None = None
) -> pd.DataFrame:
    """Read a CSV, JSON (a list of objects), JSONL or Parquet file by its extension.

    Errors name ``shown_as`` (the source as the user wrote it) if given, else ``path``.
    """
    suffix = path.suffix.lower()
    name = shown_as or path
    try:
        if suffix == ".csv":
            return pd.read_csv(path, encoding=encoding, dtype=str, keep_default_na=False, encoding_errors="strict")
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False, encoding=encoding)
        if suffix == ".json":
            return pd.DataFrame(json.loads(path.read_text(encoding=encoding)))
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise PipelineError(f"{name}: bytes that are not valid {encoding} text ({encoding_field}): {err}") from None
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise PipelineError(f"{name}: cannot be parsed as {suffix[1:]}: {err}") from None
    except FileNotFoundError:
        raise PipelineError(f"{name}: file not found") from None
    raise PipelineError(f"{name}: unsupported file type {suffix!r} (csv, json, jsonl or parquet)")

"""The data path: raw tweets and instructions to chat records, splits and the mix."""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.model_selection import train_test_split

from lorapipe.config import DataParams, InstructionsParams, MixParams, PromptParams, SplitParams
from lorapipe.data.prompts import instruction_prompt, sentiment_prompt
from lorapipe.errors import PipelineError
from lorapipe.io import atomic_dir, write_json, write_jsonl
from lorapipe.labels import label_key, read_labels
from lorapipe.records import read_records, record

log = logging.getLogger(__name__)


def _require_columns(frame: pd.DataFrame, path: Path, fields: dict[str, str | None]) -> None:
    for param, column in fields.items():
        if column is not None and column not in frame.columns:
            raise PipelineError(f"{path}: no column {column!r} ({param}); columns are {list(frame.columns)}")


def _label_text(value: Any) -> str:
    """A label cell as text; an integral float is the integer it holds (a parquet integer column with a missing
    value is read as floats, and ``label_map`` names ``0``, not ``0.0``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def listed_labels(raw: pd.Series, path: Path, data: DataParams) -> tuple[pd.Series, dict[str, int]]:
    """Each row's label as ``data.labels`` spells it (after ``label_map``, ignoring case), or None where it is not
    listed; and how many rows each unlisted value has. ``unlisted_labels: refuse`` stops at the first one."""
    tweets = data.tweets
    # An empty cell (blank text, a JSON null, a missing parquet value) is no label; pandas keeps a missing value a
    # float through astype(str), which no label rule can read.
    missing = raw.isna() | raw.map(lambda value: isinstance(value, str) and not value.strip())
    if missing.any() and data.unlisted_labels == "refuse":
        row = int(missing.to_numpy().argmax()) + 1
        raise PipelineError(
            f"{path}: row {row}: no label in column {tweets.label_field!r} ({int(missing.sum())} rows without one); "
            "fill it, or set data.unlisted_labels: drop"
        )
    labels = pd.Series(
        ["" if gap else _label_text(value) for value, gap in zip(raw, missing, strict=True)], index=raw.index
    )
    if tweets.label_map is not None:
        mapping = {str(key): value for key, value in tweets.label_map.items()}
        labels = labels.map(lambda value: mapping.get(value, value))
    spelled = {label_key(label): label for label in data.labels}
    listed = labels.map(lambda value: spelled.get(label_key(value)))
    listed[missing] = None
    unlisted = dict(sorted(Counter(labels[listed.isna() & ~missing]).items()))
    if missing.any():
        unlisted["(no label)"] = int(missing.sum())
    if unlisted and data.unlisted_labels == "refuse":
        first = next(iter(unlisted))
        raise PipelineError(
            f"{path}: label {first!r} in column {tweets.label_field!r} ({unlisted[first]} rows) is not in data.labels "
            f"{data.labels}; list it, map it with data.tweets.label_map, or set data.unlisted_labels: drop"
        )
    return listed, unlisted


def clean_tweets(frame: pd.DataFrame, path: Path, data: DataParams) -> tuple[pd.DataFrame, dict]:
    """Labelled, confident, de-duplicated rows as columns ``text`` and ``label`` (one of ``data.labels``).

    Rows whose label is not listed are dropped (or refused, as ``data.unlisted_labels`` says); rows whose
    confidence cell is empty count as below any threshold above zero.
    """
    tweets, split = data.tweets, data.split
    _require_columns(
        frame,
        path,
        {
            "data.tweets.text_field": tweets.text_field,
            "data.tweets.label_field": tweets.label_field,
            "data.tweets.confidence_field": tweets.confidence_field,
        },
    )
    if frame.empty:
        raise PipelineError(f"{path}: no rows (data.tweets.source)")
    labels, unlisted = listed_labels(frame[tweets.label_field], path, data)
    text = frame[tweets.text_field].astype(str).str.strip()
    out = pd.DataFrame({"text": text, "label": labels})
    counts: dict = {"read": len(out)}
    if unlisted:
        counts["unlisted"] = unlisted
        log.info("dropped rows whose label is not in data.labels: %s", unlisted)
    out = out[out.label.notna() & (out.text != "")]
    counts["listed"] = len(out)
    for label in data.labels:
        if not (out.label == label).any():
            raise PipelineError(
                f"{path}: no {label!r} row with text in column {tweets.label_field!r} (data.tweets.label_field, "
                "data.labels)"
            )
    if tweets.confidence_field is not None and split.min_confidence > 0:
        confidence = pd.to_numeric(frame.loc[out.index, tweets.confidence_field], errors="coerce")
        out = out[confidence.fillna(0.0) >= split.min_confidence]
    counts["confident"] = len(out)
    # A text seen with two labels is ambiguous: drop every copy; otherwise keep one.
    label_sets = out.groupby("text").label.nunique()
    out = out[out.text.map(label_sets) == 1].drop_duplicates("text")
    counts["unique"] = len(out)
    return out.reset_index(drop=True), counts


def _draw(frame: pd.DataFrame, size: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded, stratified draw of ``size`` rows, and the rest (all rows if ``size`` covers them)."""
    if size >= len(frame):
        return frame, frame.iloc[:0]
    drawn, rest = train_test_split(frame, train_size=size, stratify=frame.label, random_state=seed)
    return drawn, rest


def split_tweets(
    frame: pd.DataFrame, path: Path, split: SplitParams, labels: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Seeded, stratified train, validation and test splits of exact sizes with no text in two of them."""
    for label in labels:
        if not (frame.label == label).any():
            raise PipelineError(f"{path}: no {label!r} tweets left after filtering (data.split.min_confidence)")
    if split.balance:
        smallest = frame.label.value_counts().min()
        frame = frame.groupby("label", group_keys=False).sample(n=smallest, random_state=split.seed)
    wanted = split.train_size + split.valid_size + split.test_size
    if wanted > len(frame):
        raise PipelineError(
            f"{path}: data.split.train_size + valid_size + test_size = {wanted} exceeds the {len(frame)} "
            f"tweets left after filtering{' and balancing' if split.balance else ''}"
        )
    # Each split is drawn from what the one before left, test first, from its seed and size alone: changing
    # train_size keeps the test set, and changing valid_size keeps the test and training sets.
    rest, test = train_test_split(frame, test_size=split.test_size, stratify=frame.label, random_state=split.seed)
    train, rest = _draw(rest, split.train_size, split.seed)
    valid, _ = _draw(rest, split.valid_size, split.seed) if split.valid_size else (rest.iloc[:0], rest)
    return tuple(part.reset_index(drop=True) for part in (train, valid, test))


def sentiment_records(frame: pd.DataFrame, prompt: PromptParams, labels: list[str]) -> list[dict[str, Any]]:
    return [
        record(sentiment_prompt(text, prompt, labels), label, label=label, text=text)
        for text, label in zip(frame.text, frame.label, strict=True)
    ]


def clean_instructions(frame: pd.DataFrame, path: Path, params: InstructionsParams, split: SplitParams) -> pd.DataFrame:
    """Instruction/input/output rows, non-empty, de-duplicated, no longer than the limit."""
    _require_columns(
        frame,
        path,
        {
            "data.instructions.instruction_field": params.instruction_field,
            "data.instructions.output_field": params.output_field,
        },
    )
    has_input = params.input_field is not None and params.input_field in frame.columns
    out = pd.DataFrame(
        {
            "instruction": frame[params.instruction_field].fillna("").astype(str).str.strip(),
            "input": frame[params.input_field].fillna("").astype(str).str.strip() if has_input else "",
            "output": frame[params.output_field].fillna("").astype(str).str.strip(),
        }
    )
    out = out[(out.instruction != "") & (out.output != "")]
    total_chars = out.instruction.str.len() + out.input.str.len() + out.output.str.len()
    out = out[total_chars <= split.max_instruction_chars].drop_duplicates(["instruction", "input"])
    if out.empty:
        raise PipelineError(
            f"{path}: no instruction left after dropping empty and over-long rows (data.split.max_instruction_chars)"
        )
    return out.reset_index(drop=True)


def split_instructions(frame: pd.DataFrame, path: Path, split: SplitParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    if split.instruction_test_size >= len(frame):
        raise PipelineError(
            f"{path}: data.split.instruction_test_size = {split.instruction_test_size} leaves no "
            f"training instruction out of {len(frame)}"
        )
    shuffled = frame.sample(frac=1.0, random_state=split.seed).reset_index(drop=True)
    return shuffled.iloc[split.instruction_test_size :], shuffled.iloc[: split.instruction_test_size]


def instruction_records(frame: pd.DataFrame, prompt: PromptParams) -> list[dict[str, Any]]:
    return [
        record(
            instruction_prompt(row.instruction, row.input, prompt),
            row.output,
            instruction=row.instruction,
            input=row.input,
        )
        for row in frame.itertuples(index=False)
    ]


def label_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(r["label"] for r in rows).items()))


def mix_records(
    sentiment: list[dict],
    instructions: list[dict],
    mix: MixParams,
    sources: tuple[str, str] = ("sentiment", "instruction"),
) -> tuple[list[dict], dict]:
    """``mix.size`` records of which a share ``mix.instruction_share`` are instructions, shuffled.

    ``sources`` name the two record files in errors.
    """
    n_instructions = round(mix.size * mix.instruction_share)
    n_sentiment = mix.size - n_instructions
    for source, kind, wanted, have in (
        (sources[0], "sentiment", n_sentiment, len(sentiment)),
        (sources[1], "instruction", n_instructions, len(instructions)),
    ):
        if wanted > have:
            raise PipelineError(
                f"{source}: holds {have} {kind} records; mix.size x mix.instruction_share asks for {wanted}"
            )
    rng = random.Random(mix.seed)
    chosen = [{**r, "source": "sentiment"} for r in rng.sample(sentiment, n_sentiment)] + [
        {**r, "source": "instruction"} for r in rng.sample(instructions, n_instructions)
    ]
    rng.shuffle(chosen)
    stats = {
        "size": len(chosen),
        "sentiment": n_sentiment,
        "instructions": n_instructions,
        "instruction_share": n_instructions / len(chosen),
        "labels": label_counts([r for r in chosen if r["source"] == "sentiment"]),
    }
    return chosen, stats


def write_mix(sentiment_path: Path, labels_file: Path, instructions_path: Path, mix: MixParams, out: Path) -> dict:
    """The mix stage's work: read both record files, mix them, write ``out/train.jsonl`` and ``out/stats.json``."""
    sentiment = read_records(sentiment_path, text_fields=("label",), labels=read_labels(labels_file).labels)
    instructions = read_records(instructions_path)
    rows, stats = mix_records(sentiment, instructions, mix, (str(sentiment_path), str(instructions_path)))
    with atomic_dir(out) as staging:
        write_jsonl(staging / "train.jsonl", rows)
        write_json(staging / "stats.json", stats)
    log.info("mixed %d sentiment + %d instruction records -> %s", stats["sentiment"], stats["instructions"], out)
    return stats

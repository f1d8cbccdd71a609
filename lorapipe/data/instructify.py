"""The instructify stage's work: raw tweets and instructions to chat-format splits."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from lorapipe.config import Params, PromptParams
from lorapipe.data.prompts import instruction_prompt
from lorapipe.data.splits import (
    clean_instructions,
    clean_tweets,
    instruction_records,
    label_counts,
    sentiment_records,
    split_instructions,
    split_tweets,
)
from lorapipe.errors import PipelineError, yaml_problem
from lorapipe.io import atomic_dir, read_json, write_json, write_jsonl
from lorapipe.labels import LABELS_FILE, write_labels
from lorapipe.sources.tables import read_table

log = logging.getLogger(__name__)


def raw_file(raw_dir: Path, name: str) -> Path:
    manifest = read_json(raw_dir / "manifest.json")
    try:
        return raw_dir / manifest[name]["path"]
    except (KeyError, TypeError):
        raise PipelineError(f"{raw_dir / 'manifest.json'}: no entry {name!r}.path (rerun fetch)") from None


def out_of_sample_records(path: Path, prompt: PromptParams) -> list[dict]:
    """The hand-written instructions in ``path`` as prompts (no reference answer)."""
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: cannot read the out-of-sample instructions: {err}") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(items, list) or not items:
        raise PipelineError(f"{path}: expected a non-empty list of instructions")
    records = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not str(item.get("instruction", "")).strip():
            raise PipelineError(f"{path}: item {number} has no field 'instruction'")
        for field in ("instruction", "input", "id"):
            if item.get(field) is not None and not isinstance(item[field], str | int | float):
                kind = type(item[field]).__name__
                raise PipelineError(f"{path}: item {number} field {field!r} is a {kind}, not a text")
        records.append(
            {
                "id": str(item.get("id", number)),
                "instruction": str(item["instruction"]),
                "input": str(item.get("input") or ""),
                "prompt": instruction_prompt(str(item["instruction"]), str(item.get("input") or ""), prompt),
            }
        )
    return records


def instructify(params: Params, raw_dir: Path, out: Path, out_of_sample: Path) -> dict:
    data = params.data
    tweets_path = raw_file(raw_dir, "tweets")
    tweets, counts = clean_tweets(
        read_table(tweets_path, data.tweets.encoding, "data.tweets.encoding"), tweets_path, data
    )
    train, valid, test = split_tweets(tweets, tweets_path, data.split, data.labels)
    instructions_path = raw_file(raw_dir, "instructions")
    instructions = clean_instructions(read_table(instructions_path), instructions_path, data.instructions, data.split)
    instr_train, instr_test = split_instructions(instructions, instructions_path, data.split)

    splits = {
        "sentiment_train": sentiment_records(train, params.prompt, data.labels),
        "sentiment_valid": sentiment_records(valid, params.prompt, data.labels),
        "sentiment_test": sentiment_records(test, params.prompt, data.labels),
        "instructions_train": instruction_records(instr_train, params.prompt),
        "instructions_test": instruction_records(instr_test, params.prompt),
        "out_of_sample": out_of_sample_records(out_of_sample, params.prompt),
    }
    stats = {
        "tweets_filtering": counts,
        "labels": data.labels,
        **{name: label_counts(splits[name]) for name in ("sentiment_train", "sentiment_valid", "sentiment_test")},
        "instructions_train": len(splits["instructions_train"]),
        "instructions_test": len(splits["instructions_test"]),
    }
    with atomic_dir(out) as staging:
        for name, rows in splits.items():
            write_jsonl(staging / f"{name}.jsonl", rows)
            log.info("%s: %d records", name, len(rows))
        write_labels(staging / LABELS_FILE, data.labels)
        write_json(staging / "stats.json", stats)
    return stats

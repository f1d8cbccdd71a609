"""Training records fitted to ``train.max_length``: tokenised as the chat template renders them, then dropped, refused
or cut as ``train.overlong`` says."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lorapipe.config import TrainParams
from lorapipe.errors import PipelineError
from lorapipe.records import render_chat

log = logging.getLogger(__name__)


def tokenize_records(
    tokenizer, rows: list[dict[str, Any]], max_length: int | None = None
) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer, cut to ``max_length``; prompt length) per record, as the chat template renders
    them."""
    encoded = []
    for record in rows:
        prompt = render_chat(tokenizer, record["prompt"], add_generation_prompt=True)
        full = render_chat(tokenizer, record["prompt"] + record["completion"])
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        encoded.append((ids, len(tokenizer(prompt, add_special_tokens=False)["input_ids"])))
    return encoded


def fit_to_max_length(
    tokenizer, rows: list[dict[str, Any]], train: TrainParams, source: Path
) -> tuple[list[dict[str, Any]], int]:
    """``rows`` without those longer than ``train.max_length`` tokens (``train.overlong: drop``), and their count.

    Truncating keeps the start, so a long record loses its answer's end and the end-of-turn token, and the model
    learns to run on; ``refuse`` stops at the first such record, ``truncate`` keeps them cut (TRL's way).
    """
    encoded = tokenize_records(tokenizer, rows)
    lengths = [len(ids) for ids, _ in encoded]
    over = {i for i, length in enumerate(lengths) if length > train.max_length}
    if over and train.overlong == "refuse":
        first = min(over)
        raise PipelineError(
            f"{source}: line {first + 1}: {lengths[first]} tokens, more than train.max_length {train.max_length} "
            f"({len(over)} such records); raise train.max_length, or set train.overlong to drop or truncate"
        )
    if train.overlong == "drop":
        if len(over) == len(rows):
            raise PipelineError(f"{source}: every record is longer than train.max_length {train.max_length} tokens")
        dropped = over
        if over:
            log.info(
                "dropped %d of %d records longer than %d tokens (train.overlong)",
                len(over),
                len(rows),
                train.max_length,
            )
    else:
        # TRL drops a record whose prompt alone fills max_length (nothing of the answer is left): so do we, so
        # that the rows and the batching's lengths stay aligned with what TRL keeps.
        dropped = {i for i, (_, prompt) in enumerate(encoded) if prompt >= train.max_length}
        if over:
            log.warning(
                "%d records longer than %d tokens are truncated, %d of them dropped as no answer token is left "
                "(train.overlong)", len(over), train.max_length, len(dropped),
            )  # fmt: skip
    return [row for i, row in enumerate(rows) if i not in dropped], len(over)

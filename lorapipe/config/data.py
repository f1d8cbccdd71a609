"""``data``: the tweet and instruction tables, how they are split, and the label set."""

from __future__ import annotations

import codecs
from typing import Literal

from pydantic import field_validator, model_validator

from lorapipe.config.fields import Section, doc
from lorapipe.config.model import Source
from lorapipe.labels import label_problems, normal_label


class TweetsParams(Section):
    source: Source = doc("where the tweet table comes from (csv, json, jsonl or parquet)")
    encoding: str = doc("the text encoding of the tweet file")
    text_field: str = doc("the column that holds the tweet text")
    label_field: str = doc("the column that holds the label")
    label_map: dict[str | int, str] | None = doc(
        "raw label -> label (e.g. {'0': negative}); a value not in data.labels is unlisted; null: as is"
    )
    confidence_field: str | None = doc("the column of annotator confidence in [0, 1], or null if there is none")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError("is not a text encoding Python knows (e.g. utf-8, latin-1)") from None
        return value


class InstructionsParams(Section):
    source: Source = doc("where the instruction/answer pairs come from")
    instruction_field: str = doc("the column of the instruction")
    input_field: str | None = doc("the column of an optional input to the instruction, or null")
    output_field: str = doc("the column of the reference answer")


class SplitParams(Section):
    seed: int = doc("seed of balancing, splitting and shuffling", ge=0)
    min_confidence: float = doc("drop tweets whose confidence is below this (an empty cell counts as 0)", ge=0, le=1)
    balance: bool = doc("down-sample every label to as many tweets as the rarest has, before splitting")
    train_size: int = doc("training tweets, drawn after the test set (so changing it keeps the test set)", gt=0)
    valid_size: int = doc(
        "validation tweets, drawn from the training pool after the training tweets and scored while training; "
        "0: no validation",
        ge=0,
    )
    test_size: int = doc("held-out test tweets", gt=0)
    instruction_test_size: int = doc("held-out instructions for the token F1 / ROUGE-L / BERTScore table", gt=0)
    max_instruction_chars: int = doc("drop instruction pairs longer than this, all fields together", gt=0)


class DataParams(Section):
    tweets: TweetsParams
    instructions: InstructionsParams
    split: SplitParams
    labels: list[str] = doc(
        "the answers the models learn, two or more short texts in order; with two, precision, recall and F1 are "
        "of the first"
    )
    unlisted_labels: Literal["drop", "refuse"] = doc(
        "rows whose label (after label_map) is not in labels: drop them, or refuse the file"
    )

    @model_validator(mode="after")
    def _a_row_of_each_label_per_split(self) -> DataParams:
        # A stratified split needs at least one row of each label in every split it draws.
        for key, size in (("test_size", self.split.test_size), ("valid_size", self.split.valid_size)):
            if 0 < size < len(self.labels):
                raise ValueError(
                    f"split.{key} {size} is fewer than the {len(self.labels)} labels: each split needs a row of every "
                    f"label; raise data.split.{key} to {len(self.labels)} or more"
                    + (" (or 0: no validation)" if key == "valid_size" else "")
                )
        return self

    @field_validator("labels")
    @classmethod
    def _usable_labels(cls, value: list[str]) -> list[str]:
        problem = label_problems(value)
        if problem:
            raise ValueError(problem)
        # Written as the pipeline reads them: the data's spellings (another Unicode form, more spaces) match.
        return [normal_label(label) for label in value]

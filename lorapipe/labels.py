"""The label set of a classification study: the answers the models learn, how answers are read, where it is kept.

``data.labels`` in params.yaml lists them (two or more short texts, multi-word ones included); instructify
writes them to ``labels.json`` beside the records it prepares, and training, evaluation and the report read
that file, so every stage after instructify agrees on the labels and their order without reading params.
With two labels the first is the positive class of precision, recall and F1 (the seed's figures).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lorapipe.errors import PipelineError
from lorapipe.io import read_json, write_json

LABELS_FILE = "labels.json"
NO_LABEL = "none"  # the confusion matrix's column for answers that name no label


def label_words(label: str) -> list[str]:
    """A label's words as they are compared: Unicode NFC ('café' typed or decomposed), case and spacing aside."""
    return unicodedata.normalize("NFC", label).casefold().split()


def label_key(label: str) -> str:
    """What two spellings of one label share (:func:`label_words`, joined)."""
    return " ".join(label_words(label))


def normal_label(label: str) -> str:
    """A label as the pipeline writes it: NFC, one space between its words, its case kept."""
    return " ".join(unicodedata.normalize("NFC", label).split())


def label_problems(labels: Sequence[str]) -> str | None:
    """Why ``labels`` cannot be a label set, or None: fewer than two, blank, duplicate (ignoring case, spacing and
    Unicode form),
    or one contained word for word in another ("spam" in "not spam": an answer naming one would name both)."""
    if len(labels) < 2:
        return "needs at least two labels"
    for label in labels:
        if not label.strip() or label != label.strip() or "\n" in label:
            return f"{label!r} is blank, has a line break, or starts or ends with a space"
        if label.casefold() == NO_LABEL:
            return f"{label!r} is the name the confusion matrix gives answers that name no label"
        if not re.search(r"[^\W_]", label):
            return f"{label!r} has no letter or digit, so no answer could be read as it"
    seen: dict[str, str] = {}
    for label in labels:
        key = label_key(label)
        if key in seen:
            return f"{label!r} and {seen[key]!r} are the same label (case, spacing and Unicode form aside)"
        seen[key] = label
    for label in labels:
        for other in labels:
            inner, outer = label_key(label), label_key(other)
            if inner != outer and f" {inner} " in f" {outer} ":
                return (
                    f"{label!r} is part of {other!r}: an answer naming {other!r} would name both; "
                    "rename one (e.g. 'ham' and 'spam')"
                )
    return None


# A label's edges may not touch a letter or digit: "Positive.", "**negative**" and "_positive_" name a label,
# "positively" and "nonnegative" do not, so an adverb or a compound is never read as an answer.
_EDGE_BEFORE, _EDGE_AFTER = r"(?<![^\W_])", r"(?![^\W_])"


def describe(labels: Sequence[str]) -> str:
    """The labels as a prompt names them: "positive or negative", "positive, negative or neutral"."""
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


@dataclass(frozen=True)
class LabelSet:
    """The labels in their order; reads which of them a generated answer names."""

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        problem = label_problems(self.labels)
        if problem:
            raise ValueError(problem)

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        # Longest first: at one position the longer of two overlapping labels wins.
        words = sorted(self.labels, key=lambda label: -len(label))
        alternatives = "|".join(r"\s+".join(map(re.escape, normal_label(label).split())) for label in words)
        return re.compile(f"{_EDGE_BEFORE}({alternatives}){_EDGE_AFTER}", re.IGNORECASE)

    def _canonical(self, text: str) -> str:
        key = label_key(text)
        return next(label for label in self.labels if label_key(label) == key)

    def named(self, answer: str) -> list[str]:
        """The distinct labels ``answer`` names, in the order it names them."""
        found: list[str] = []
        for match in self._pattern.finditer(unicodedata.normalize("NFC", answer)):
            label = self._canonical(match.group(1))
            if label not in found:
                found.append(label)
        return found

    def parse(self, answer: str) -> str | None:
        """The first label ``answer`` names (its prediction), or None if it names none."""
        match = self._pattern.search(unicodedata.normalize("NFC", answer))
        return self._canonical(match.group(1)) if match else None


def write_labels(path: Path, labels: Sequence[str]) -> None:
    write_json(path, {"labels": list(labels)})


def read_labels(path: Path) -> LabelSet:
    """The label set instructify wrote; one error naming the file if it is not one."""
    value = read_json(path)
    labels = value.get("labels") if isinstance(value, dict) else None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise PipelineError(f"{path}: field 'labels' is not a list of texts (rerun instructify)")
    try:
        return LabelSet(tuple(labels))
    except ValueError as err:
        raise PipelineError(f"{path}: field 'labels': {err}") from None

"""Scores: sentiment classification metrics and answer-vs-reference text similarity.

Everything here runs offline: ROUGE-L comes from ``rouge_score`` directly (the ``evaluate``
library's loader needs the hub) and BERTScore uses a local encoder folder.
"""

from __future__ import annotations

import importlib.util
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from lorapipe.config import SENTIMENT_LABELS
from lorapipe.errors import PipelineError

POSITIVE = "positive"
NO_LABEL = "none"
CONFUSION_LABELS = (*SENTIMENT_LABELS, NO_LABEL)

# A label word not glued to other letters: "Positive.", "**negative**", "_positive_" count;
# "positively" and "nonnegative" do not, so an adverb or a compound is never read as an answer.
_LABEL_WORD = re.compile(r"(?<![a-z])(" + "|".join(SENTIMENT_LABELS) + r")(?![a-z])", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def parse_label(answer: str) -> str | None:
    """The first sentiment label word in a generated answer, lower-cased, or None if it names none."""
    match = _LABEL_WORD.search(answer)
    return match.group(1).lower() if match else None


def label_is_settled(answer: str) -> bool:
    """Whether :func:`parse_label` of any continuation of ``answer`` is already decided: its first label word
    is followed by a character that is not a letter, so no later text can change or precede it."""
    match = _LABEL_WORD.search(answer)
    return match is not None and match.end() < len(answer)


def classification_metrics(actual: Sequence[str], predicted: Sequence[str | None]) -> dict[str, float]:
    """Accuracy and the positive class's F1, precision and recall; a missing prediction counts as wrong."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if not actual or len(actual) != len(predicted):
        raise ValueError(f"need as many predictions as labels, and at least one (got {len(actual)}, {len(predicted)})")
    predicted = [p if p is not None else NO_LABEL for p in predicted]
    precision, recall, f1, _ = precision_recall_fscore_support(
        actual, predicted, labels=[POSITIVE], average=None, zero_division=0.0
    )
    return {
        "accuracy": round(float(accuracy_score(actual, predicted)), 4),
        "f1": round(float(f1[0]), 4),
        "precision": round(float(precision[0]), 4),
        "recall": round(float(recall[0]), 4),
        "no_label_rate": round(sum(p == NO_LABEL for p in predicted) / len(predicted), 4),
    }


def confusion_matrix(actual: Sequence[str], predicted: Sequence[str | None]) -> list[list[int]]:
    """Counts with rows = actual (positive, negative) and columns = predicted (positive, negative, none)."""
    counts = Counter(zip(actual, (p if p is not None else NO_LABEL for p in predicted), strict=True))
    return [[counts[(row, column)] for column in CONFUSION_LABELS] for row in SENTIMENT_LABELS]


def normalize_answer(text: str) -> list[str]:
    """SQuAD normalisation: lower case, no punctuation, no articles, whitespace tokens."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 between two texts after SQuAD normalisation (1.0 when both are empty)."""
    predicted, expected = normalize_answer(prediction), normalize_answer(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure per pair, with the Porter stemmer as in the original ROUGE setup."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def resolve_encoder(name: str) -> str:
    """A BERTScore encoder as a local folder: a path, or an installed package that ships one under ``model/``.

    Any other name is passed on as a hub model id (full-scale profiles only).
    """
    if Path(name).is_dir():
        return str(Path(name).resolve())
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        if not (folder / "config.json").is_file():
            raise PipelineError(f"package {name!r} (eval.bertscore_model) has no model folder at {folder}")
        return str(folder)
    return name


def bertscore_f1(predictions: Sequence[str], references: Sequence[str], encoder: str, num_layers: int) -> list[float]:
    """BERTScore F1 per pair from the first ``num_layers`` layers of ``encoder``, not rescaled.

    A pair with a blank side scores 0.0 (bert_score itself fails on a blank text with transformers 5).
    """
    from bert_score import score

    scored = [i for i, (p, r) in enumerate(zip(predictions, references, strict=True)) if p.strip() and r.strip()]
    values = [0.0] * len(predictions)
    if scored:
        _, _, f1 = score(
            [predictions[i] for i in scored],
            [references[i] for i in scored],
            model_type=resolve_encoder(encoder),
            num_layers=num_layers,
            lang="en",
        )
        for i, value in zip(scored, f1.tolist(), strict=True):
            values[i] = value
    return values


def text_scores(
    predictions: Sequence[str], references: Sequence[str], encoder: str, num_layers: int
) -> dict[str, list[float]]:
    """Per-pair token F1, ROUGE-L and BERTScore F1."""
    return {
        "token_f1": [token_f1(p, r) for p, r in zip(predictions, references, strict=True)],
        "rouge_l": rouge_l(predictions, references),
        "bertscore_f1": bertscore_f1(predictions, references, encoder, num_layers),
    }


def mean_scores(per_pair: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(sum(values) / len(values), 4) for name, values in per_pair.items()}

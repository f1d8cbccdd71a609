"""Classification figures of predicted labels against actual ones, for any label set.

Shared by evaluation (held-out tweets), training (the validation split, scored while it trains) and the report
(confusion matrices).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from lorapipe.labels import NO_LABEL


def classification_metrics(
    actual: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro F1, each label's precision, recall and F1, and the share of answers that name no label
    (which count as wrong).

    ``f1``, ``precision`` and ``recall`` are the first label's with two labels (the seed's positive-class figures)
    and macro averages over the labels with more.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if not actual or len(actual) != len(predicted):
        raise ValueError(f"need as many predictions as labels, and at least one (got {len(actual)}, {len(predicted)})")
    predicted = [p if p is not None else NO_LABEL for p in predicted]
    precision, recall, f1, _ = precision_recall_fscore_support(
        actual, predicted, labels=list(labels), average=None, zero_division=0.0
    )
    per_label = {
        label: {"precision": round(float(p), 4), "recall": round(float(r), 4), "f1": round(float(f), 4)}
        for label, p, r, f in zip(labels, precision, recall, f1, strict=True)
    }
    macro = {name: round(float(values.mean()), 4) for name, values in (("precision", precision), ("recall", recall))}
    headline = per_label[labels[0]] if len(labels) == 2 else {**macro, "f1": round(float(f1.mean()), 4)}
    return {
        "accuracy": round(float(accuracy_score(actual, predicted)), 4),
        "f1": headline["f1"],
        "precision": headline["precision"],
        "recall": headline["recall"],
        "macro_f1": round(float(f1.mean()), 4),
        "no_label_rate": round(sum(p == NO_LABEL for p in predicted) / len(predicted), 4),
        "per_label": per_label,
    }


def confusion_matrix(actual: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str]) -> list[list[int]]:
    """Counts with rows = actual labels and columns = predicted labels, then answers that name none."""
    counts = Counter(zip(actual, (p if p is not None else NO_LABEL for p in predicted), strict=True))
    return [[counts[(row, column)] for column in (*labels, NO_LABEL)] for row in labels]

"""The report's figures: confusion matrices and training curves as PNG files."""

from __future__ import annotations

from pathlib import Path

from lorapipe.config import SENTIMENT_LABELS
from lorapipe.evaluation.metrics import CONFUSION_LABELS
from lorapipe.report.inputs import BASELINE, CURVES, ReportInputs, model_order

BASELINE_TITLE = "TF-IDF + logistic regression"
CONFUSION_PNG = "confusion.png"
CURVES_PNG = "training_curves.png"


def _draw_confusion(confusion: dict[str, list[list[int]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = sorted(confusion, key=lambda n: (n == BASELINE, model_order(n)))
    figure, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        matrix = confusion[name]
        axis.imshow(matrix, cmap="Blues")
        axis.set_xticks(range(len(CONFUSION_LABELS)), CONFUSION_LABELS)
        axis.set_yticks(range(len(SENTIMENT_LABELS)), SENTIMENT_LABELS)
        axis.set_xlabel("predicted")
        axis.set_ylabel("actual")
        axis.set_title(BASELINE_TITLE if name == BASELINE else name, fontsize=9)
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                axis.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _draw_curves(curves: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.2), squeeze=False)
    for axis, metric in zip(axes[0], CURVES, strict=True):
        for name, series in sorted(curves.items(), key=lambda item: model_order(item[0])):
            if series.get(metric):
                steps, values = zip(*series[metric], strict=True)
                axis.plot(steps, values, label=name)
        axis.set_xlabel("logging step (every train.logging_steps optimizer steps)")
        axis.set_title(metric.replace("_", " "))
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_figures(inputs: ReportInputs, out: Path) -> list[Path]:
    """Write the PNGs that :func:`render_markdown` links to; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    if inputs.confusion:
        _draw_confusion(inputs.confusion, out / CONFUSION_PNG)
        written.append(out / CONFUSION_PNG)
    if inputs.curves:
        _draw_curves(inputs.curves, out / CURVES_PNG)
        written.append(out / CURVES_PNG)
    return written

"""The report's figures: confusion matrices and training curves as PNG files."""

from __future__ import annotations

from pathlib import Path

from lorapipe.labels import NO_LABEL
from lorapipe.report.inputs import BASELINE, CURVES, VALIDATION_CURVES, ReportInputs, model_order

BASELINE_TITLE = "TF-IDF + logistic regression"
CONFUSION_PNG = "confusion.png"
CURVES_PNG = "training_curves.png"


def _draw_confusion(confusion: dict[str, list[list[int]]], labels: tuple[str, ...], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = sorted(confusion, key=lambda n: (n == BASELINE, model_order(n)))
    side = 1.6 + 0.8 * len(labels)
    figure, axes = plt.subplots(1, len(names), figsize=(side * len(names), side - 0.2), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        matrix = confusion[name]
        axis.imshow(matrix, cmap="Blues")
        axis.set_xticks(range(len(labels) + 1), [*labels, NO_LABEL], rotation=30 if len(labels) > 2 else 0)
        axis.set_yticks(range(len(labels)), labels)
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

    metrics = [m for m in CURVES + VALIDATION_CURVES if any(series.get(m) for series in curves.values())]
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for name, series in sorted(curves.items(), key=lambda item: model_order(item[0])):
            if series.get(metric):
                steps, values = zip(*series[metric], strict=True)
                axis.plot(steps, values, label=name, marker="o" if metric in VALIDATION_CURVES else None)
        axis.set_xlabel("optimizer step")
        axis.set_title(metric.replace("eval/", "validation ").replace("_", " "))
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
        _draw_confusion(inputs.confusion, inputs.labels, out / CONFUSION_PNG)
        written.append(out / CONFUSION_PNG)
    if inputs.curves:
        _draw_curves(inputs.curves, out / CURVES_PNG)
        written.append(out / CURVES_PNG)
    return written

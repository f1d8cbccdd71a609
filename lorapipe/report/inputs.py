"""What the report shows, read from the files the other stages wrote (every path given by the caller)."""

from __future__ import annotations

import csv
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorapipe.classification import confusion_matrix
from lorapipe.config import ReportParams
from lorapipe.errors import PipelineError, yaml_problem
from lorapipe.io import read_json, read_jsonl
from lorapipe.labels import read_labels

MODEL_ORDER = ("base", "sentiment", "mixed")
BASELINE = "baseline"
CURVES = ("loss", "learning_rate")
VALIDATION_CURVES = ("eval/accuracy", "eval/macro_f1")  # the validation split, scored while training


def model_order(name: str) -> tuple[int, str]:
    return (MODEL_ORDER.index(name) if name in MODEL_ORDER else len(MODEL_ORDER), name)


@dataclass(frozen=True)
class ModelFiles:
    """One model's files: its evaluation metrics and predictions; for adapters, training summary, curves, card."""

    metrics: Path
    predictions: Path
    training: Path | None = None
    curves: Path | None = None
    card: Path | None = None


@dataclass(frozen=True)
class ReportSources:
    """Every file the report stage reads, as its command line names them."""

    models: dict[str, ModelFiles]
    labels_file: Path
    baseline_metrics: Path | None = None
    baseline_predictions: Path | None = None
    manifests: tuple[Path, ...] = ()
    params_file: Path | None = None
    lock_file: Path | None = None
    repository: Path = Path(".")


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report shows, already read from disk."""

    params: ReportParams
    metrics: dict[str, dict[str, Any]]
    labels: tuple[str, ...]
    baseline: dict[str, Any] | None = None
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    curves: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    out_of_sample: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)
    params_text: str = ""
    manifests: dict[str, Any] = field(default_factory=dict)
    git: dict[str, Any] = field(default_factory=dict)
    dvc_lock: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """Evaluated models: base, sentiment, mixed first, then any other in name order."""
        return sorted(self.metrics, key=model_order)


def read_curve(path: Path) -> list[tuple[float, float]]:
    """(step, value) pairs of a DVCLive TSV whose value column is named like the file."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if rows and (path.stem not in rows[0] or "step" not in rows[0]):
        raise PipelineError(f"{path}: no column 'step' or {path.stem!r}")
    return [(float(r["step"]), float(r[path.stem])) for r in rows]


def read_confusion(path: Path, labels: tuple[str, ...]) -> list[list[int]]:
    """The confusion matrix of a predictions CSV with columns actual and predicted."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"actual", "predicted"} <= rows[0].keys():
        raise PipelineError(f"{path}: no column 'actual' or 'predicted'")
    return confusion_matrix([r["actual"] for r in rows], [r["predicted"] for r in rows], labels)


def find_curve(live_dir: Path, metric: str) -> Path | None:
    """The per-log training curve of ``metric`` in a DVCLive folder.

    ``plots/metrics/<metric>.tsv`` holds one row per logging step; ``plots/metrics/train/`` holds only the
    end-of-training summary, a single point.
    """
    path = live_dir / "plots" / "metrics" / f"{metric}.tsv"
    return path if path.exists() else None


def git_state(root: Path) -> dict[str, Any]:
    """The commit the report was made from and whether the work tree differed from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def dvc_lock_hashes(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Each stage's outputs in dvc.lock with their content hashes."""
    if not path.is_file():
        return {}
    try:
        lock = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    return {
        stage: [(out["path"], out.get("md5", "")) for out in entry.get("outs", [])]
        for stage, entry in (lock.get("stages") or {}).items()
    }


def _model_extras(name: str, files: ModelFiles, labels: tuple[str, ...], inputs: dict[str, dict]) -> None:
    confusion = files.predictions / "confusion.csv"
    if confusion.is_file():
        inputs["confusion"][name] = read_confusion(confusion, labels)
    answers = files.predictions / "out_of_sample.jsonl"
    if answers.is_file():
        inputs["out_of_sample"][name] = read_jsonl(answers, ("id", "instruction", "answer"))
    if files.training is not None:
        inputs["training"][name] = read_json(files.training)
    if files.card is not None:
        inputs["cards"][name] = read_json(files.card)
    if files.curves is not None:
        found = {metric: find_curve(files.curves, metric) for metric in CURVES + VALIDATION_CURVES}
        if any(found.values()):
            inputs["curves"][name] = {metric: read_curve(path) for metric, path in found.items() if path is not None}


def load_report_inputs(sources: ReportSources, params: ReportParams) -> ReportInputs:
    """Read every file named in ``sources``; a model's metrics file must exist, extras are read where present."""
    if not sources.models:
        raise PipelineError("no model to report on (pass --model NAME=METRICS,PREDICTIONS)")
    metrics = {name: read_json(files.metrics) for name, files in sources.models.items()}
    labels = read_labels(sources.labels_file).labels
    extras: dict[str, dict] = {"confusion": {}, "out_of_sample": {}, "training": {}, "cards": {}, "curves": {}}
    for name, files in sources.models.items():
        _model_extras(name, files, labels, extras)
    baseline = None
    if sources.baseline_metrics is not None:
        baseline = read_json(sources.baseline_metrics)
        if sources.baseline_predictions is not None:
            extras["confusion"][BASELINE] = read_confusion(sources.baseline_predictions / "confusion.csv", labels)
    params_file = sources.params_file
    return ReportInputs(
        params=params,
        metrics=metrics,
        labels=labels,
        baseline=baseline,
        **extras,
        params_text=params_file.read_text(encoding="utf-8") if params_file and params_file.is_file() else "",
        manifests={str(path): read_json(path) for path in sources.manifests},
        git=git_state(sources.repository),
        dvc_lock=dvc_lock_hashes(sources.lock_file) if sources.lock_file else {},
    )

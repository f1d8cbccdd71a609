"""The report: tables, confusion matrices, training curves and side-by-side answers in one Markdown file.

:func:`load_report_inputs` reads every file; :func:`render_markdown` and :func:`draw_figures` are pure
functions of what it returns, so a test can render a report from a few fixture values.
"""

from __future__ import annotations

import csv
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorapipe.config import SENTIMENT_LABELS, ReportParams
from lorapipe.errors import PipelineError
from lorapipe.io import atomic_dir, read_json, read_jsonl
from lorapipe.metrics import CONFUSION_LABELS, confusion_matrix

log = logging.getLogger(__name__)

MODEL_ORDER = ("base", "sentiment", "mixed")
BASELINE = "baseline"
BASELINE_TITLE = "TF-IDF + logistic regression"
CURVES = ("loss", "learning_rate")
CONFUSION_PNG = "confusion.png"
CURVES_PNG = "training_curves.png"
SCORES = (("accuracy", "Accuracy"), ("f1", "F1"), ("precision", "Precision"), ("recall", "Recall"))
TEXT_SCORES = (("token_f1", "Token F1"), ("rouge_l", "ROUGE-L"), ("bertscore_f1", "BERTScore F1"))
COST = (
    ("sentiment", "Tweets, both ways (s)"),
    ("instructions", "Instructions (s)"),
    ("out_of_sample", "Out-of-sample (s)"),
    ("text_scores", "Text scores (s)"),
)
TRAINING = (
    ("examples", "Examples"),
    ("steps", "Steps"),
    ("tokens_per_second", "Tokens/s"),
    ("wall_seconds", "Wall time (s)"),
    ("peak_memory_mib", "Peak memory (MiB)"),
    ("final_loss", "Final loss"),
)


def _order(name: str) -> tuple[int, str]:
    return (MODEL_ORDER.index(name) if name in MODEL_ORDER else len(MODEL_ORDER), name)


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report shows, already read from disk."""

    params: ReportParams
    metrics: dict[str, dict[str, Any]]
    baseline: dict[str, Any] | None = None
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    curves: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    out_of_sample: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    params_text: str = ""
    manifests: dict[str, Any] = field(default_factory=dict)
    git: dict[str, Any] = field(default_factory=dict)
    dvc_lock: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """Evaluated models: base, sentiment, mixed first, then any other in name order."""
        return sorted(self.metrics, key=_order)


# --- reading ----------------------------------------------------------------------------------------------------


def read_curve(path: Path) -> list[tuple[float, float]]:
    """(step, value) pairs of a DVCLive TSV whose value column is named like the file."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if rows and (path.stem not in rows[0] or "step" not in rows[0]):
        raise PipelineError(f"{path}: no column 'step' or {path.stem!r}")
    return [(float(r["step"]), float(r[path.stem])) for r in rows]


def read_confusion(path: Path) -> list[list[int]]:
    """The confusion matrix of a predictions CSV with columns actual and predicted."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"actual", "predicted"} <= rows[0].keys():
        raise PipelineError(f"{path}: no column 'actual' or 'predicted'")
    return confusion_matrix([r["actual"] for r in rows], [r["predicted"] for r in rows])


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
        raise PipelineError(f"{path}: not valid YAML: {err}") from None
    return {
        stage: [(out["path"], out.get("md5", "")) for out in entry.get("outs", [])]
        for stage, entry in (lock.get("stages") or {}).items()
    }


def load_report_inputs(root: Path, params: ReportParams) -> ReportInputs:
    """Read the metrics, predictions, training logs and provenance under ``root`` (the repository)."""
    metrics_dir, predictions = root / "metrics", root / "data" / "predictions"
    candidates = {p.stem: read_json(p) for p in sorted(metrics_dir.glob("*.json")) if p.stem != BASELINE}
    metrics = {name: m for name, m in candidates.items() if isinstance(m, dict) and "score" in m.get("sentiment", {})}
    if not metrics:
        raise PipelineError(f"{metrics_dir}: no model metrics (run eval_base and eval_all first)")
    names = list(metrics)
    baseline_path = metrics_dir / f"{BASELINE}.json"
    confusion = {}
    for name in [*names, BASELINE]:
        path = predictions / name / "confusion.csv"
        if path.is_file():
            confusion[name] = read_confusion(path)
    training, curves = {}, {}
    for name in names:
        summary = metrics_dir / f"train_{name}.json"
        if summary.is_file():
            training[name] = read_json(summary)
        found = {metric: find_curve(root / "dvclive" / name, metric) for metric in CURVES}
        if any(found.values()):
            curves[name] = {metric: read_curve(path) for metric, path in found.items() if path is not None}
    out_of_sample = {
        name: read_jsonl(predictions / name / "out_of_sample.jsonl", ("id", "instruction", "answer"))
        for name in names
        if (predictions / name / "out_of_sample.jsonl").is_file()
    }
    manifests = {
        rel: read_json(root / rel)
        for rel in ("data/raw/manifest.json", "models/base/manifest.json")
        if (root / rel).is_file()
    }
    params_file = root / "params.yaml"
    return ReportInputs(
        params=params,
        metrics=metrics,
        baseline=read_json(baseline_path) if baseline_path.is_file() else None,
        confusion=confusion,
        training=training,
        curves=curves,
        out_of_sample=out_of_sample,
        params_text=params_file.read_text(encoding="utf-8") if params_file.is_file() else "",
        manifests=manifests,
        git=git_state(root),
        dvc_lock=dvc_lock_hashes(root / "dvc.lock"),
    )


# --- rendering --------------------------------------------------------------------------------------------------


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def _score_rows(inputs: ReportInputs, way: str, extra: tuple[str, ...] = ()) -> list[list[str]]:
    rows = []
    for name in inputs.models:
        scores = inputs.metrics[name].get("sentiment", {}).get(way)
        if scores:
            rows.append(
                [name, *(_number(scores.get(key)) for key, _ in SCORES), *(_number(scores.get(k)) for k in extra)]
            )
    return rows


def _sentiment_section(inputs: ReportInputs) -> list[str]:
    n = next((m["examples"]["sentiment"] for m in inputs.metrics.values() if "examples" in m), None)
    lines = [
        f"## Sentiment on {n} held-out tweets" if n else "## Sentiment on held-out tweets",
        "",
        "**Label scoring**: the label whose tokens the model finds more likely right after the prompt.",
        "",
    ]
    rows = _score_rows(inputs, "score")
    if inputs.baseline:
        tfidf = inputs.baseline["sentiment"]["tfidf"]
        rows.append([f"{BASELINE_TITLE} (baseline)", *(_number(tfidf.get(key)) for key, _ in SCORES)])
    for name, reference in inputs.params.reference.items():
        rows.append(
            [
                f"*{name}: {inputs.params.reference_name}*",
                *(f"*{_number(getattr(reference, key))}*" for key, _ in SCORES),
            ]
        )
    lines += _table(["Model", *(title for _, title in SCORES)], rows)
    lines += [
        "**Generation**: the first label word in the model's greedy answer; an answer that names no label "
        "counts as wrong.",
        "",
    ]
    lines += _table(
        ["Model", *(title for _, title in SCORES), "No label"], _score_rows(inputs, "generate", ("no_label_rate",))
    )
    if inputs.confusion:
        lines += [
            "Confusion matrices (generated labels; the baseline's predictions):",
            "",
            f"![Confusion matrices]({CONFUSION_PNG})",
            "",
        ]
    return lines


def _instruction_section(inputs: ReportInputs) -> list[str]:
    rows = [
        [name, *(_number(inputs.metrics[name]["instructions"].get(key)) for key, _ in TEXT_SCORES)]
        for name in inputs.models
        if "instructions" in inputs.metrics[name]
    ]
    if not rows:
        return []
    n = next(m["examples"]["instructions"] for m in inputs.metrics.values() if "instructions" in m)
    return [
        f"## Instructions: {n} held-out instructions against their reference answers",
        "",
        "Greedy answers. Token F1 is SQuAD-style bag-of-words overlap; BERTScore F1 uses the "
        "configured local encoder without baseline rescaling.",
        "",
        *_table(["Model", *(title for _, title in TEXT_SCORES)], rows),
    ]


def _training_section(inputs: ReportInputs) -> list[str]:
    if not inputs.training and not inputs.curves:
        return []
    lines = ["## Training", ""]
    if inputs.training:
        rows = [
            [name, *(_number(summary.get(key), 4 if key == "final_loss" else 1) for key, _ in TRAINING)]
            for name, summary in sorted(inputs.training.items(), key=lambda item: _order(item[0]))
        ]
        lines += _table(["Model", *(title for _, title in TRAINING)], rows)
    if inputs.curves:
        lines += [f"![Training loss and learning rate]({CURVES_PNG})", ""]
    return lines


def _cost_section(inputs: ReportInputs) -> list[str]:
    rows = [
        [
            name,
            *(_number(m["seconds"].get(key), 1) for key, _ in COST),
            _number(m.get("speed", {}).get("sentiment_examples_per_second"), 1),
            _number(m.get("speed", {}).get("generated_tokens_per_second"), 1),
        ]
        for name in inputs.models
        if "seconds" in (m := inputs.metrics[name])
    ]
    if not rows:
        return []
    return [
        "## Evaluation cost",
        "",
        *_table(["Model", *(title for _, title in COST), "Tweets/s", "Generated tokens/s"], rows),
    ]


def _out_of_sample_section(inputs: ReportInputs) -> list[str]:
    names = [n for n in inputs.models if n in inputs.out_of_sample]
    if not names or inputs.params.examples == 0:
        return []
    answers = {name: {row["id"]: row for row in inputs.out_of_sample[name]} for name in names}
    lines = ["## Out-of-sample instructions", "", "Instructions no model saw in training, answered greedily.", ""]
    for row in inputs.out_of_sample[names[0]][: inputs.params.examples]:
        lines += [f"### {row['id']}", "", f"> {_cell(row['instruction'])}"]
        if row.get("input"):
            lines += [">", f"> Input: {_cell(row['input'])}"]
        lines += ["", *_table(names, [[_cell(answers[n].get(row["id"], {}).get("answer", "")) for n in names]])]
    return lines


def _source(entry: dict[str, Any]) -> str:
    kind = entry.get("kind")
    if kind == "registry":
        return f"{entry['package']}=={entry['version']} `{entry['member']}` (sha256 {entry['sha256'][:12]})"
    if kind == "hub":
        return f"{entry['id']}@{entry['revision']}"
    return f"`{entry.get('path', '?')}`"


def _provenance_section(inputs: ReportInputs) -> list[str]:
    commit = inputs.git.get("commit")
    state = {True: " (work tree dirty: uncommitted changes)", False: " (clean)", None: ""}[inputs.git.get("dirty")]
    lines = [
        "## Provenance",
        "",
        f"Git commit: `{commit}`{state}" if commit else "Git commit: unknown (not a Git repository, or no commit yet)",
        "",
    ]
    sources = []
    model = inputs.manifests.get("models/base/manifest.json")
    if model:
        sources.append([f"base model ({model.get('name', '?')})", _source(model.get("source", {}))])
    for name, entry in inputs.manifests.get("data/raw/manifest.json", {}).items():
        sources.append([name, _source(entry)])
    if sources:
        lines += _table(["Source", "Version"], sources)
    if inputs.dvc_lock:
        rows = [[stage, f"`{path}`", f"`{digest}`"] for stage, outs in inputs.dvc_lock.items() for path, digest in outs]
        lines += ["Outputs as recorded in dvc.lock:", "", *_table(["Stage", "Output", "Hash"], rows)]
    if inputs.params_text:
        lines += ["Parameters (params.yaml):", "", "```yaml", inputs.params_text.rstrip(), "```", ""]
    return lines


def render_markdown(inputs: ReportInputs) -> str:
    """The report's Markdown; figures are referenced by the names :func:`draw_figures` writes."""
    lines = [f"# {inputs.params.title}", ""]
    for section in (
        _sentiment_section,
        _instruction_section,
        _training_section,
        _cost_section,
        _out_of_sample_section,
        _provenance_section,
    ):
        lines += section(inputs)
    return "\n".join(lines).rstrip() + "\n"


# --- figures ----------------------------------------------------------------------------------------------------


def _draw_confusion(confusion: dict[str, list[list[int]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = sorted(confusion, key=lambda n: (n == BASELINE, _order(n)))
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
        for name, series in sorted(curves.items(), key=lambda item: _order(item[0])):
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


def write_report(inputs: ReportInputs, out: Path) -> Path:
    """Write ``out/report.md`` and its figures, replacing the old folder only when complete."""
    with atomic_dir(out) as staging:
        figures = draw_figures(inputs, staging)
        (staging / "report.md").write_text(render_markdown(inputs), encoding="utf-8")
    log.info("wrote %s/report.md and %d figures", out, len(figures))
    return out / "report.md"

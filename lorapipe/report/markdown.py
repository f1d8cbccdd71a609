"""The report: tables, figures, side-by-side answers, model cards and provenance in one Markdown file.

:func:`render_markdown` is a pure function of :class:`~lorapipe.report.inputs.ReportInputs`, so a test can
render a report from a few fixture values; :func:`write_report` adds the figures and the model cards.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path, PurePosixPath
from typing import Any

from lorapipe.io import atomic_dir
from lorapipe.models.model_card import CardFacts, describe_source, render_model_card
from lorapipe.report.figures import BASELINE_TITLE, CONFUSION_PNG, CURVES_PNG, draw_figures
from lorapipe.report.inputs import ReportInputs, model_order

log = logging.getLogger(__name__)

SCORES = (
    ("accuracy", "Accuracy"),
    ("f1", "F1"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("macro_f1", "Macro F1"),
)
PER_LABEL = (("precision", "precision"), ("recall", "recall"), ("f1", "F1"))
TEXT_SCORES = (("token_f1", "Token F1"), ("rouge_l", "ROUGE-L"), ("bertscore_f1", "BERTScore F1"))
COST = (
    ("sentiment", "Tweets, both ways (s)"),
    ("generation", "Instructions, all answers (s)"),
    ("text_scores", "Text scores (s)"),
)
TRAINING = (
    ("examples", "Examples"),
    ("steps", "Steps"),
    ("examples_per_second", "Examples/s"),
    ("tokens_per_second", "Tokens/s"),
    ("wall_seconds", "Wall time (s)"),
    ("precision", "Precision"),
    ("peak_rss_mib", "Peak memory (RSS, MiB)"),
    ("final_loss", "Final loss"),
)
VALIDATION = (("accuracy", "Validation accuracy"), ("macro_f1", "Validation macro F1"), ("seconds", "Validation (s)"))
EVAL_SPEED = ("Tweets/s", "Generated tokens/s", "Peak memory (RSS, MiB)")
CARDS = "cards"


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_MARKDOWN = str.maketrans({char: "\\" + char for char in "\\`*_[]<>|#"})


def markdown_text(text: str) -> str:
    """User text (a label, a model name, an answer) shown as itself: Markdown's emphasis, code, links, HTML and
    table characters backslash-escaped, so that ``bad *news*`` or ``good | great`` neither render nor split a
    table row."""
    return text.translate(_MARKDOWN)


def _cell(text: str) -> str:
    """User text that stays inside one Markdown table cell, as itself."""
    return markdown_text(text.strip()).replace("\n", "<br>") or "*(empty)*"


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
                [
                    _cell(name),
                    *(_number(scores.get(key)) for key, _ in SCORES),
                    *(_number(scores.get(k)) for k in extra),
                ]
            )
    return rows


def _headline_note(labels: tuple[str, ...]) -> str:
    if len(labels) == 2:
        return f"F1, precision and recall are of the label '{markdown_text(labels[0])}' (the positive class)."
    return "F1, precision and recall are macro averages over the labels."


def _per_label_rows(inputs: ReportInputs) -> list[list[str]]:
    rows = []
    for name in inputs.models:
        scores = inputs.metrics[name].get("sentiment", {}).get("score", {}).get("per_label")
        if scores:
            rows.append(
                [
                    _cell(name),
                    *(_number(scores.get(label, {}).get(key)) for label in inputs.labels for key, _ in PER_LABEL),
                ]
            )
    return rows


def _sentiment_section(inputs: ReportInputs) -> list[str]:
    n = next((m["examples"]["sentiment"] for m in inputs.metrics.values() if "examples" in m), None)
    lines = [
        f"## Sentiment on {n} held-out tweets" if n else "## Sentiment on held-out tweets",
        "",
        f"Labels: {', '.join(map(markdown_text, inputs.labels))}. {_headline_note(inputs.labels)}",
        "",
        "**Label scoring**: the label the model finds likeliest as its whole answer (the label's tokens and the "
        "end-of-turn token after them).",
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
                *(
                    f"*{_number(value)}*" if (value := getattr(reference, key, None)) is not None else ""
                    for key, _ in SCORES
                ),
            ]
        )
    lines += _table(["Model", *(title for _, title in SCORES)], rows)
    per_label = _per_label_rows(inputs)
    if per_label:
        header = [f"{_cell(label)} {title}" for label in inputs.labels for _, title in PER_LABEL]
        lines += ["Each label (label scoring):", "", *_table(["Model", *header], per_label)]
    scored_on = [
        f"{name}: {inputs.metrics[name]['scored_on']}" for name in inputs.models if "scored_on" in inputs.metrics[name]
    ]
    if scored_on:
        lines += ["Weights each model was scored with: " + "; ".join(scored_on) + ".", ""]
    lines += [
        "**Generation**: the first label the model's greedy answer names; an answer that names no label "
        "counts as wrong, and one that names several counts as its first.",
        "",
    ]
    lines += _table(
        ["Model", *(title for _, title in SCORES), "No label", "Several labels"],
        _score_rows(inputs, "generate", ("no_label_rate", "several_labels_rate")),
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
            [
                name,
                *(_number(summary.get(key), 4 if key == "final_loss" else 1) for key, _ in TRAINING),
                *(
                    _number((summary.get("validation") or {}).get(key), 1 if key == "seconds" else 3)
                    for key, _ in VALIDATION
                ),
            ]
            for name, summary in sorted(inputs.training.items(), key=lambda item: model_order(item[0]))
        ]
        lines += _table(["Model", *(title for _, title in TRAINING), *(title for _, title in VALIDATION)], rows)
    if inputs.curves:
        lines += [
            f"![Training loss, learning rate and validation accuracy]({CURVES_PNG})",
            "",
            "Validation: the held-out validation tweets (drawn from the training pool, never the test set) scored by "
            "label likelihood every `train.eval_steps` optimizer steps and at the end.",
            "",
        ]
    return lines


def _cost_section(inputs: ReportInputs) -> list[str]:
    rows = [
        [
            name,
            *(_number(m["seconds"].get(key), 1) for key, _ in COST),
            _number(m.get("speed", {}).get("sentiment_examples_per_second"), 1),
            _number(m.get("speed", {}).get("generated_tokens_per_second"), 1),
            _number(m.get("peak_rss_mib"), 0),
        ]
        for name in inputs.models
        if "seconds" in (m := inputs.metrics[name])
    ]
    if not rows:
        return []
    return [
        "## Evaluation cost",
        "",
        *_table(["Model", *(title for _, title in COST), *EVAL_SPEED], rows),
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
    for manifest in inputs.manifests.values():
        if "source" in manifest and "name" in manifest:  # the base model's manifest
            sources.append([f"base model ({manifest['name']})", describe_source(manifest["source"])])
        else:  # the data manifest: one entry per data set
            sources += [[name, describe_source(entry)] for name, entry in manifest.items()]
    if sources:
        lines += _table(["Source", "Version"], sources)
    lines += [note for manifest in inputs.manifests.values() if (note := gguf_note(manifest))]
    if inputs.dvc_lock:
        rows = [[stage, f"`{path}`", f"`{digest}`"] for stage, outs in inputs.dvc_lock.items() for path, digest in outs]
        lines += ["Outputs as recorded in dvc.lock:", "", *_table(["Stage", "Output", "Hash"], rows)]
    if inputs.params_text:
        lines += ["Parameters (params.yaml):", "", "```yaml", inputs.params_text.rstrip(), "```", ""]
    return lines


def gguf_note(manifest: dict[str, Any]) -> str | None:
    """What a base model converted from a GGUF file is: its quantised weights dequantised, not the original ones."""
    source = manifest.get("source", {})
    if "name" not in manifest or source.get("format") != "gguf":
        return None
    file = PurePosixPath(source.get("member") or source.get("path") or "").name
    kind = match.group(1) if (match := re.search(r"\.([A-Za-z0-9_]+)\.gguf$", file)) else "quantised"
    return (
        f"The base model is `{file}`, {kind} GGUF weights dequantised to fp32: every figure of the base model, and "
        f"every adapter trained on it, is of these weights, not of {manifest['name']}'s original release.\n"
    )


def _cards_section(inputs: ReportInputs) -> list[str]:
    names = [name for name in inputs.models if name in inputs.cards]
    if not names:
        return []
    links = ", ".join(f"[{name}]({CARDS}/{name}.md)" for name in names)
    return ["## Model cards", "", f"Each adapter's card with its evaluation figures: {links}.", ""]


def card_with_evaluation(card: dict[str, Any], metrics: dict[str, Any]) -> str:
    """An adapter's model card (the facts its train stage saved) with its evaluation figures filled in."""
    return render_model_card(CardFacts(**{**card, "evaluation": metrics}))


def render_markdown(inputs: ReportInputs) -> str:
    """The report's Markdown; figures are referenced by the names :func:`draw_figures` writes."""
    lines = [f"# {inputs.params.title}", ""]
    for section in (
        _sentiment_section,
        _instruction_section,
        _training_section,
        _cost_section,
        _out_of_sample_section,
        _cards_section,
        _provenance_section,
    ):
        lines += section(inputs)
    return "\n".join(lines).rstrip() + "\n"


def write_report(inputs: ReportInputs, out: Path) -> Path:
    """Write ``out/report.md``, its figures and the adapters' cards, replacing the old folder only when complete."""
    with atomic_dir(out) as staging:
        figures = draw_figures(inputs, staging)
        (staging / "report.md").write_text(render_markdown(inputs), encoding="utf-8")
        for name, card in inputs.cards.items():
            (staging / CARDS).mkdir(exist_ok=True)
            (staging / CARDS / f"{name}.md").write_text(
                card_with_evaluation(card, inputs.metrics[name]), encoding="utf-8"
            )
    log.info("wrote %s/report.md, %d figures and %d model cards", out, len(figures), len(inputs.cards))
    return out / "report.md"

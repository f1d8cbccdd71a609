"""The README's "Your own data" path end to end: a local CSV with four labels becomes an instruction study.

As a user would: copy the embedded profile, point it at the file, its columns and its labels, switch to it
with ``lorapipe.cli.profiles`` and ``dvc exp run``. The base model and the instructions are the tiny local
stand-ins the other pipeline tests use, so nothing reaches a hub.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import yaml
from test_pipeline import run, stages_run

from conftest import build_tiny_model, copy_tracked_files, tiny_params, write_instructions_json

pytestmark = pytest.mark.slow

LABELS = ["billing", "technical issue", "account", "other"]
MESSAGES = {
    "Billing": ["I was charged twice", "refund my last invoice", "why is my bill so high"],
    "technical issue": ["the app crashes on start", "login page shows an error", "sync never finishes"],
    "ACCOUNT": ["change my email address", "delete my profile", "add a second user"],
    "other": ["do you have a store in Paris", "thanks for the help", "what are your opening hours"],
    "spam": ["win a free phone now"],  # a category the study leaves out (data.unlisted_labels: drop)
}


def write_tickets(path: Path, per_label: int = 16) -> Path:
    """A support-ticket export as users have them: its own column names, labels in mixed case, one extra label."""
    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ticket_id", "message", "category"])
        for raw, texts in MESSAGES.items():
            for i in range(per_label if raw != "spam" else 3):
                writer.writerow([f"{raw[:3]}-{i}", f"{rng.choice(texts)} (ticket {i})", raw])
    return path


def my_profile(tickets: Path, tiny: Path, instructions: Path) -> dict:
    """profiles/embedded.yaml edited as the README says (and shrunk to the tiny model's scale)."""
    params = tiny_params(tiny, tickets, instructions)
    params["data"]["tweets"].update(
        source={"kind": "local", "path": str(tickets)},
        encoding="utf-8",
        text_field="message",
        label_field="category",
        label_map=None,
        confidence_field=None,
    )
    params["data"]["labels"] = LABELS
    params["data"]["unlisted_labels"] = "drop"
    params["data"]["split"].update(min_confidence=0.0, train_size=24, valid_size=8, test_size=16)
    params["prompt"]["sentiment_template"] = "Which team should handle this ticket: {labels}?\nTicket: {text}"
    params["report"].update(title="Support tickets", reference={})
    return params


def test_a_local_csv_with_four_labels_runs_end_to_end(tmp_path):
    work = copy_tracked_files(tmp_path / "repo")
    profile = my_profile(
        write_tickets(tmp_path / "tickets.csv"),
        build_tiny_model(tmp_path / "tiny-model"),
        write_instructions_json(tmp_path / "instructions.json"),
    )
    (work / "profiles" / "my-tickets.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "my tickets"], work)

    run(["python", "-m", "lorapipe.cli.profiles", "my-tickets"], work)
    output = run(["dvc", "exp", "run", "--name", "tickets"], work)
    assert {"instructify", "train_sentiment", "train_mixed", "eval_base", "eval_all", "report"} <= stages_run(output)

    prepared = work / "data" / "prepared"
    assert json.loads((prepared / "labels.json").read_text()) == {"labels": LABELS}
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["tweets_filtering"]["unlisted"] == {"spam": 3}
    assert stats["sentiment_test"] == dict.fromkeys(sorted(LABELS), 4)  # balanced and stratified
    first = json.loads((prepared / "sentiment_test.jsonl").read_text().splitlines()[0])
    assert first["prompt"][1]["content"].startswith(
        "Which team should handle this ticket: billing, technical issue, account or other?\nTicket: "
    )
    assert first["label"] in LABELS and first["completion"][0]["content"] == first["label"]

    for name in ("base", "sentiment", "mixed"):
        scores = json.loads((work / "metrics" / f"{name}.json").read_text())["sentiment"]
        assert set(scores["score"]["per_label"]) == set(LABELS)
        assert 0.0 <= scores["score"]["macro_f1"] <= 1.0 and 0.0 <= scores["generate"]["several_labels_rate"] <= 1.0
        with open(work / "data" / "predictions" / name / "confusion.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 16 and {r["actual"] for r in rows} == set(LABELS)
        assert {r["predicted"] for r in rows} <= {*LABELS, "none"}
    baseline = json.loads((work / "metrics" / "baseline.json").read_text())["sentiment"]["tfidf"]
    assert set(baseline["per_label"]) == set(LABELS)

    for name in ("sentiment", "mixed"):
        curve = (work / "dvclive" / name / "plots" / "metrics" / "eval" / "accuracy.tsv").read_text().splitlines()
        assert curve[0] == "step\taccuracy" and len(curve) >= 3  # every train.eval_steps (3) and at the end
        assert json.loads((work / "metrics" / f"train_{name}.json").read_text())["validation"]["examples"] == 8
    report = (work / "report" / "report.md").read_text()
    assert report.startswith("# Support tickets")
    assert "Labels: billing, technical issue, account, other. F1, precision and recall are macro averages" in report
    assert "| Model | billing precision | billing recall | billing F1 | technical issue precision |" in report

    shown = json.loads(run(["dvc", "exp", "show", "--json"], work))
    assert "tickets" in json.dumps(shown) and "macro_f1" in json.dumps(shown)
    plots = json.loads(run(["dvc", "plots", "show", "--json"], work))["data"]
    drawn = json.dumps(plots["Validation accuracy"])  # dvc.yaml's plot of both adapters' validation accuracy
    assert "eval/accuracy.tsv" in drawn and '"accuracy"' in drawn

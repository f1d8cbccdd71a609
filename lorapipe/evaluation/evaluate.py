"""One model's evaluation: sentiment both ways, instruction answers and their scores, written as files.

The decoding itself is :mod:`lorapipe.decoding`; this module turns test records into its inputs and its
outputs into the metrics JSON and the prediction files that the report and ``dvc plots`` read.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from lorapipe.classification import classification_metrics
from lorapipe.config import EvalParams
from lorapipe.decoding import generate_answers, predict_sentiment
from lorapipe.evaluation.baseline import tfidf_predictions
from lorapipe.evaluation.metrics import mean_scores, text_scores
from lorapipe.host import peak_rss_mib, release_free_memory
from lorapipe.io import atomic_dir, atomic_file, write_json, write_jsonl
from lorapipe.labels import NO_LABEL, read_labels
from lorapipe.models.loading import inference_precision
from lorapipe.records import answer_text, read_records

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class EvalData:
    """The evaluation inputs, validated: the labels, held-out tweets, held-out and out-of-sample instructions."""

    labels: tuple[str, ...]
    sentiment: list[dict[str, Any]]
    instructions: list[dict[str, Any]]
    out_of_sample: list[dict[str, Any]]


@dataclass(frozen=True)
class Outputs:
    """What one evaluation writes: its metrics and its prediction files (name -> rows)."""

    metrics: dict[str, Any]
    files: dict[str, list[dict[str, Any]]]


def load_sentiment(
    path: Path, labels: Sequence[str], size: int | None = None, allow_empty: bool = False
) -> list[dict[str, Any]]:
    """The first ``size`` (all if None) labelled tweets: records with a ``label`` of ``labels`` and their ``text``."""
    return read_records(path, text_fields=("text", "label"), limit=size, labels=labels, allow_empty=allow_empty)


def load_instructions(path: Path, size: int | None = None) -> list[dict[str, Any]]:
    """The first ``size`` held-out instructions: records with an ``instruction``; the completion is the reference."""
    return read_records(path, text_fields=("instruction",), limit=size)


def load_out_of_sample(path: Path) -> list[dict[str, Any]]:
    """The out-of-sample instructions: prompts with an ``id`` and ``instruction``, and no reference answer."""
    return read_records(path, completion=False, text_fields=("id", "instruction"))


def load_eval_data(
    labels_file: Path, tweets: Path, instructions: Path, out_of_sample: Path, params: EvalParams
) -> EvalData:
    labels = read_labels(labels_file).labels
    data = EvalData(
        labels,
        load_sentiment(tweets, labels, params.sentiment_size),
        load_instructions(instructions, params.instruction_size),
        load_out_of_sample(out_of_sample),
    )
    log.info(
        "labels %s; read %d tweets from %s, %d instructions from %s, %d out-of-sample instructions from %s",
        list(labels),
        len(data.sentiment),
        tweets,
        len(data.instructions),
        instructions,
        len(data.out_of_sample),
        out_of_sample,
    )
    return data


def _confusion_rows(actual: Sequence[str], predicted: Sequence[str | None]) -> list[dict[str, str]]:
    return [{"actual": a, "predicted": p or NO_LABEL} for a, p in zip(actual, predicted, strict=True)]


def _sentiment_scores(
    actual: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str], no_label: bool = True
) -> dict:
    scores = classification_metrics(actual, predicted, labels)
    if not no_label:
        del scores["no_label_rate"]
    return scores


def evaluate_baseline(
    train: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]], labels: Sequence[str]
) -> Outputs:
    """The TF-IDF + logistic regression baseline on the same held-out tweets."""
    actual = [r["label"] for r in test]
    predicted = tfidf_predictions([r["text"] for r in train], [r["label"] for r in train], [r["text"] for r in test])
    metrics = {
        "sentiment": {"tfidf": _sentiment_scores(actual, predicted, labels, no_label=False)},
        "examples": {"train": len(train), "sentiment": len(test)},
    }
    rows = [{"text": r["text"], "label": r["label"], "predicted": p} for r, p in zip(test, predicted, strict=True)]
    return Outputs(metrics, {"sentiment.jsonl": rows, "confusion.csv": _confusion_rows(actual, predicted)})


def _timed(seconds: dict[str, float], name: str, work: Callable[[], T]) -> T:
    started = time.perf_counter()
    result = work()
    seconds[name] = round(time.perf_counter() - started, 1)
    return result


def evaluate_model(model, tokenizer, data: EvalData, params: EvalParams) -> Outputs:
    """Both sentiment ways, the scored instruction answers and the out-of-sample answers of one model."""
    seconds: dict[str, float] = {}
    with inference_precision(params.precision, model.device):
        predictions = _timed(
            seconds,
            "sentiment",
            lambda: predict_sentiment(
                model,
                tokenizer,
                [r["prompt"] for r in data.sentiment],
                data.labels,
                params.batch_size,
                params.sentiment_max_new_tokens,
                max_prompt_tokens=params.max_prompt_tokens,
            ),
        )
        # Held-out and out-of-sample instructions in one length-sorted run: fewer, fuller decoding batches.
        prompts = [r["prompt"] for r in data.instructions + data.out_of_sample]
        release_free_memory()  # what the tweets left free, before the answers' cache (evaluation's peak) is made
        generated = _timed(
            seconds,
            "generation",
            lambda: generate_answers(
                model,
                tokenizer,
                prompts,
                params.generation_batch_size,
                params.max_new_tokens,
                max_prompt_tokens=params.max_prompt_tokens,
            ),
        )
    answers, extra = generated.texts[: len(data.instructions)], generated.texts[len(data.instructions) :]
    references = [answer_text(r) for r in data.instructions]
    per_pair = _timed(
        seconds,
        "text_scores",
        lambda: text_scores(answers, references, params.bertscore_model, params.bertscore_num_layers),
    )
    actual = [r["label"] for r in data.sentiment]
    generated_labels = [p.generated_label for p in predictions]
    several = round(sum(p.labels_named > 1 for p in predictions) / len(predictions), 4)
    metrics = {
        "sentiment": {
            # An answer naming several labels counts as its first (several_labels_rate says how often, counted on
            # the whole answers, as predict_sentiment decodes each to its end).
            "generate": {**_sentiment_scores(actual, generated_labels, data.labels), "several_labels_rate": several},
            "score": _sentiment_scores(actual, [p.score_label for p in predictions], data.labels, no_label=False),
        },
        "instructions": mean_scores(per_pair),
        "examples": {"sentiment": len(actual), "instructions": len(references), "out_of_sample": len(extra)},
        # Prompts cut in the middle to eval.max_prompt_tokens (tweets; held-out and out-of-sample instructions).
        "truncated_prompts": {"sentiment": sum(p.truncated for p in predictions), "instructions": generated.truncated},
        "seconds": seconds,
        "threads": torch.get_num_threads(),  # chosen once when the stage started (lorapipe/host/threads.py)
        "peak_rss_mib": peak_rss_mib(),
        "speed": {
            "sentiment_examples_per_second": round(len(actual) / max(seconds["sentiment"], 0.1), 2),
            "generated_tokens_per_second": round(generated.new_tokens / max(seconds["generation"], 0.1), 1),
        },
    }
    files = {
        "sentiment.jsonl": [
            {
                "text": r["text"],
                "label": r["label"],
                "answer": p.answer,
                "generated_label": p.generated_label,
                "score_label": p.score_label,
                "logprobs": {k: round(v, 4) for k, v in p.logprobs.items()},
            }
            for r, p in zip(data.sentiment, predictions, strict=True)
        ],
        "confusion.csv": _confusion_rows(actual, generated_labels),
        "instructions.jsonl": [
            {
                "instruction": r["instruction"],
                "input": r.get("input") or "",
                "reference": reference,
                "answer": answer,
                **{name: round(values[i], 4) for name, values in per_pair.items()},
            }
            for i, (r, reference, answer) in enumerate(zip(data.instructions, references, answers, strict=True))
        ],
        "out_of_sample.jsonl": [
            {"id": r["id"], "instruction": r["instruction"], "input": r.get("input") or "", "answer": answer}
            for r, answer in zip(data.out_of_sample, extra, strict=True)
        ],
    }
    return Outputs(metrics, files)


def write_outputs(outputs: Outputs, metrics_path: Path, predictions_dir: Path) -> None:
    """Write the predictions folder, then the metrics file, each replacing the old one only when complete."""
    with atomic_dir(predictions_dir) as staging:
        for name, rows in outputs.files.items():
            if name.endswith(".csv"):
                with open(staging / name, "w", newline="", encoding="utf-8") as handle:
                    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
            else:
                write_jsonl(staging / name, rows)
    with atomic_file(metrics_path) as staging:
        write_json(staging, outputs.metrics)
    log.info("wrote %s and %s/ (%s)", metrics_path, predictions_dir, ", ".join(outputs.files))

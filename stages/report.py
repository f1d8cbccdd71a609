"""report: one Markdown report with figures and model cards from every model's metrics, predictions and logs.

    python stages/report.py --params params.yaml --out report --labels data/prepared/labels.json \
        --model base=metrics/base.json,data/predictions/base \
        --model sentiment=metrics/sentiment.json,data/predictions/sentiment \
        --training sentiment=metrics/train_sentiment.json --curves sentiment=dvclive/sentiment \
        --card sentiment=models/adapters/sentiment/card.json \
        --baseline metrics/baseline.json,data/predictions/baseline \
        --manifest data/raw/manifest.json --manifest models/base/manifest.json --lock dvc.lock

Reads the ``report`` params; prints the whole params file in the report for the record.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.errors import PipelineError
from lorapipe.io import run_stage
from lorapipe.report.inputs import ModelFiles, ReportSources, load_report_inputs
from lorapipe.report.markdown import write_report


def paths(value: str, count: int) -> list[Path]:
    parts = value.split(",")
    if len(parts) != count or not all(parts):
        raise argparse.ArgumentTypeError(f"expected {count} comma-separated paths, got {value!r}")
    return [Path(p) for p in parts]


def named(count: int):
    """An argparse type for NAME=PATH[,PATH]: (name, paths)."""

    def parse(value: str) -> tuple[str, list[Path]]:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
        return name, paths(rest, count)

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the report folder to write")
    parser.add_argument("--labels", type=Path, required=True, help="the label set instructify wrote")
    parser.add_argument("--model", type=named(2), action="append", required=True, help="NAME=METRICS,PREDICTIONS")
    parser.add_argument("--training", type=named(1), action="append", default=[], help="NAME=TRAINING_SUMMARY")
    parser.add_argument("--curves", type=named(1), action="append", default=[], help="NAME=DVCLIVE_FOLDER")
    parser.add_argument("--card", type=named(1), action="append", default=[], help="NAME=ADAPTER_FOLDER/card.json")
    parser.add_argument("--baseline", type=lambda v: paths(v, 2), help="METRICS,PREDICTIONS of the TF-IDF baseline")
    parser.add_argument("--manifest", type=Path, action="append", default=[], help="a fetch manifest")
    parser.add_argument("--lock", type=Path, help="dvc.lock, for the output hashes in the provenance section")
    args = parser.parse_args()
    names = [name for name, _ in args.model]
    twice = next((name for name in names if names.count(name) > 1), None)
    extras = {
        option: {name: found[0] for name, found in getattr(args, option)} for option in ("training", "curves", "card")
    }
    sources = ReportSources(
        models={
            name: ModelFiles(
                metrics, predictions, extras["training"].get(name), extras["curves"].get(name), extras["card"].get(name)
            )
            for name, (metrics, predictions) in args.model
        },
        labels_file=args.labels,
        baseline_metrics=args.baseline[0] if args.baseline else None,
        baseline_predictions=args.baseline[1] if args.baseline else None,
        manifests=tuple(args.manifest),
        params_file=args.params,
        lock_file=args.lock,
    )

    def body() -> None:
        if twice is not None:  # the models are kept by name: a second one would silently replace the first
            raise PipelineError(f"--model {twice}: given twice; give each model its own name")
        write_report(load_report_inputs(sources, load_params(args.params).report), args.out)

    run_stage("report", body)


if __name__ == "__main__":
    main()

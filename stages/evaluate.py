"""eval_base / eval_all: score one model on the held-out tweets and instructions.

    python stages/evaluate.py --base models/base [--adapter models/adapters/sentiment] \
        --labels data/prepared/labels.json --tweets data/prepared/sentiment_test.jsonl \
        --instructions data/prepared/instructions_test.jsonl \
        --out-of-sample data/prepared/out_of_sample.jsonl --metrics metrics/sentiment.json \
        --predictions data/predictions/sentiment [--baseline-train data/prepared/sentiment_train.jsonl \
        --baseline-metrics metrics/baseline.json --baseline-predictions data/predictions/baseline]

Reads only the ``eval`` params. With the --baseline-* arguments it also scores the TF-IDF baseline.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.evaluation.evaluate import (
    evaluate_baseline,
    evaluate_model,
    load_eval_data,
    load_sentiment,
    write_outputs,
)
from lorapipe.evaluation.kernels import use_faster_fp32_kernel
from lorapipe.host import bound_onednn_cache, shared_cores
from lorapipe.io import run_stage
from lorapipe.models.adapters import load_adapted
from lorapipe.models.loading import load_tokenizer, require_adapter, tokenizer_dir

log = logging.getLogger("lorapipe.stages.evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True, help="the base model folder")
    parser.add_argument("--adapter", type=Path, help="an adapter folder; none to score the base model alone")
    parser.add_argument("--labels", type=Path, required=True, help="the label set instructify wrote")
    parser.add_argument("--tweets", type=Path, required=True, help="held-out tweet records")
    parser.add_argument("--instructions", type=Path, required=True, help="held-out instruction records")
    parser.add_argument("--out-of-sample", type=Path, required=True, help="out-of-sample instruction prompts")
    parser.add_argument("--metrics", type=Path, required=True, help="the metrics JSON to write")
    parser.add_argument("--predictions", type=Path, required=True, help="the predictions folder to write")
    parser.add_argument("--baseline-train", type=Path, help="training tweets for the TF-IDF baseline")
    parser.add_argument("--baseline-metrics", type=Path)
    parser.add_argument("--baseline-predictions", type=Path)
    args = parser.parse_args()
    baseline = (args.baseline_train, args.baseline_metrics, args.baseline_predictions)
    if any(baseline) and not all(baseline):
        parser.error("--baseline-train, --baseline-metrics and --baseline-predictions go together")

    def body() -> None:
        bound_onednn_cache()  # before the first matmul (merging an adapter is one)
        params = load_params(args.params).eval
        adapter = require_adapter(args.adapter) if args.adapter else None
        data = load_eval_data(args.labels, args.tweets, args.instructions, args.out_of_sample, params)
        if args.baseline_train:
            train = load_sentiment(args.baseline_train, data.labels)
            write_outputs(
                evaluate_baseline(train, data.sentiment, data.labels), args.baseline_metrics, args.baseline_predictions
            )
        with shared_cores():
            started = time.perf_counter()
            model, on = load_adapted(args.base, adapter, params.precision, params.adapter_base == "as_trained")
            tokenizer = load_tokenizer(tokenizer_dir(args.base, adapter), padding_side="left")
            log.info(
                "loaded %s%s in %.1f s", args.base, f" + {adapter}" if adapter else "", time.perf_counter() - started
            )
            kernel = use_faster_fp32_kernel(model, params.precision)
            outputs = evaluate_model(model, tokenizer, data, params)
        if kernel is not None:
            outputs.metrics["fp32_kernel"] = kernel
        outputs.metrics["scored_on"] = on.describe(model.dtype, adapter is not None)
        write_outputs(outputs, args.metrics, args.predictions)

    run_stage(f"evaluate {args.adapter or args.base}", body)


if __name__ == "__main__":
    main()

"""eval_base / eval_all: score the base model, or each adapter in turn, on the held-out tweets and instructions.

    python stages/evaluate.py --base models/base [--adapter models/adapters/sentiment ...] \
        --labels data/prepared/labels.json --tweets data/prepared/sentiment_test.jsonl \
        --instructions data/prepared/instructions_test.jsonl \
        --out-of-sample data/prepared/out_of_sample.jsonl --metrics metrics/sentiment.json ... \
        --predictions data/predictions/sentiment ... [--baseline-train data/prepared/sentiment_train.jsonl \
        --baseline-metrics metrics/baseline.json --baseline-predictions data/predictions/baseline]

Without --adapter it scores the base model; with several, each adapter in turn on a fresh copy of the base,
writing the n-th --metrics and --predictions: one process for eval_all's two adapters saves the second one's
imports and loading (~10 s), and each model's metrics keep their own peak memory. Every adapter is checked
before the first is scored. Reads only the ``eval`` params. With the --baseline-* arguments it also scores the
TF-IDF baseline.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from pathlib import Path

from lorapipe.config import EvalParams, load_params
from lorapipe.errors import PipelineError
from lorapipe.evaluation.evaluate import (
    EvalData,
    Outputs,
    evaluate_baseline,
    evaluate_model,
    load_eval_data,
    load_sentiment,
    write_outputs,
)
from lorapipe.evaluation.kernels import use_faster_fp32_kernel
from lorapipe.host import bound_onednn_cache, release_free_memory, reset_peak_rss, shared_cores
from lorapipe.io import run_stage
from lorapipe.models.adapters import checked_scoring_base, load_adapted
from lorapipe.models.loading import load_tokenizer, require_adapter, tokenizer_dir

log = logging.getLogger("lorapipe.stages.evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True, help="the base model folder")
    parser.add_argument(
        "--adapter", type=Path, action="append", default=[], help="an adapter folder (repeatable); none: the base"
    )
    parser.add_argument("--labels", type=Path, required=True, help="the label set instructify wrote")
    parser.add_argument("--tweets", type=Path, required=True, help="held-out tweet records")
    parser.add_argument("--instructions", type=Path, required=True, help="held-out instruction records")
    parser.add_argument("--out-of-sample", type=Path, required=True, help="out-of-sample instruction prompts")
    parser.add_argument("--metrics", type=Path, action="append", required=True, help="metrics JSON to write, per model")
    parser.add_argument(
        "--predictions", type=Path, action="append", required=True, help="predictions folder, per model"
    )
    parser.add_argument("--baseline-train", type=Path, help="training tweets for the TF-IDF baseline")
    parser.add_argument("--baseline-metrics", type=Path)
    parser.add_argument("--baseline-predictions", type=Path)
    args = parser.parse_args()
    baseline = (args.baseline_train, args.baseline_metrics, args.baseline_predictions)
    if any(baseline) and not all(baseline):
        parser.error("--baseline-train, --baseline-metrics and --baseline-predictions go together")
    models = max(1, len(args.adapter))
    if len(args.metrics) != models or len(args.predictions) != models:
        parser.error(f"one --metrics and one --predictions for each of the {models} model(s) scored")

    def body() -> None:
        for option, values in (("--predictions", args.predictions), ("--metrics", args.metrics)):
            shared = next((value for value in values if values.count(value) > 1), None)
            if shared is not None:  # the second model's files would silently replace the first's
                raise PipelineError(f"{option} {shared}: given for two models; give each model its own")
        bound_onednn_cache()  # before the first matmul (merging an adapter is one)
        params = load_params(args.params).eval
        adapters = [require_adapter(adapter) for adapter in args.adapter] or [None]
        for adapter in adapters:  # all refusals before the first model is scored
            checked_scoring_base(args.base, adapter, params.adapter_base == "as_trained")
        data = load_eval_data(args.labels, args.tweets, args.instructions, args.out_of_sample, params)
        if args.baseline_train:
            train = load_sentiment(args.baseline_train, data.labels)
            write_outputs(
                evaluate_baseline(train, data.sentiment, data.labels), args.baseline_metrics, args.baseline_predictions
            )
        with shared_cores():
            for adapter, metrics, predictions in zip(adapters, args.metrics, args.predictions, strict=True):
                write_outputs(score(args.base, adapter, data, params), metrics, predictions)
                gc.collect()  # the model's reference cycles, before the next one loads
                release_free_memory()

    run_stage(f"evaluate {', '.join(map(str, args.adapter)) or args.base}", body)


def score(base: Path, adapter: Path | None, data: EvalData, params: EvalParams) -> Outputs:
    """One model's outputs; its metrics' peak memory is its own (counted from before it loads)."""
    reset_peak_rss()
    started = time.perf_counter()
    model, on = load_adapted(base, adapter, params.precision, params.adapter_base == "as_trained")
    tokenizer = load_tokenizer(tokenizer_dir(base, adapter), padding_side="left")
    log.info("loaded %s%s in %.1f s", base, f" + {adapter}" if adapter else "", time.perf_counter() - started)
    kernel = use_faster_fp32_kernel(model, params.precision, pinned=params.fp32_kernel)
    outputs = evaluate_model(model, tokenizer, data, params)
    if kernel is not None:
        outputs.metrics["fp32_kernel"] = kernel
    outputs.metrics["scored_on"] = on.describe(model.dtype, adapter is not None)
    return outputs


if __name__ == "__main__":
    main()

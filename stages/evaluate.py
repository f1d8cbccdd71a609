"""eval_base / eval_all: score models on the held-out tweets and instructions.

    python stages/evaluate.py base              # the base model alone, plus the TF-IDF baseline
    python stages/evaluate.py sentiment mixed   # the base model with each adapter in models/adapters/<name>

Each model writes metrics/<name>.json and data/predictions/<name>/; only ``eval`` params are read.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.evaluation import evaluate_baseline, evaluate_model, load_eval_data, load_sentiment, write_outputs
from lorapipe.io import run_stage
from lorapipe.modeling import load_for_inference, load_tokenizer, require_adapter

log = logging.getLogger("lorapipe.stages.evaluate")

PREPARED = Path("data/prepared")
BASE = Path("models/base")
ADAPTERS = Path("models/adapters")
METRICS = Path("metrics")
PREDICTIONS = Path("data/predictions")


def adapter_dir(name: str) -> Path | None:
    """No adapter for ``base``; otherwise models/adapters/<name>, checked before any model is loaded."""
    return None if name == "base" else require_adapter(ADAPTERS / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="base, or adapter names under models/adapters")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    def body() -> None:
        params = load_params(args.params).eval
        adapters = {name: adapter_dir(name) for name in args.names}
        data = load_eval_data(PREPARED, params)
        if "base" in adapters:
            train = load_sentiment(PREPARED / "sentiment_train.jsonl")
            write_outputs(evaluate_baseline(train, data.sentiment), METRICS / "baseline.json", PREDICTIONS / "baseline")
        tokenizer = load_tokenizer(BASE, padding_side="left")
        for name, adapter in adapters.items():
            started = time.perf_counter()
            model = load_for_inference(BASE, adapter)
            log.info(
                "%s: loaded %s%s in %.1f s",
                name,
                BASE,
                f" + {adapter}" if adapter else "",
                time.perf_counter() - started,
            )
            write_outputs(evaluate_model(model, tokenizer, data, params), METRICS / f"{name}.json", PREDICTIONS / name)

    run_stage(f"evaluate {' '.join(args.names)}", body)


if __name__ == "__main__":
    main()

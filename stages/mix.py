"""mix: the sentiment train set mixed with instructions at a share from params, into data/mixed/."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.data import mix_records
from lorapipe.io import atomic_dir, read_jsonl, run_stage, write_json, write_jsonl

log = logging.getLogger("lorapipe.mix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sentiment", type=Path, default=Path("data/prepared/sentiment_train.jsonl"))
    parser.add_argument("--instructions", type=Path, default=Path("data/prepared/instructions_train.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("data/mixed"))
    args = parser.parse_args()

    def body() -> None:
        params = load_params(args.params)
        sentiment = read_jsonl(args.sentiment, required=("prompt", "completion", "label"))
        instructions = read_jsonl(args.instructions, required=("prompt", "completion"))
        rows, stats = mix_records(sentiment, instructions, params.mix)
        with atomic_dir(args.out) as staging:
            write_jsonl(staging / "train.jsonl", rows)
            write_json(staging / "stats.json", stats)
        log.info(
            "mixed %d sentiment + %d instruction records -> %s", stats["sentiment"], stats["instructions"], args.out
        )

    run_stage("mix", body)


if __name__ == "__main__":
    main()

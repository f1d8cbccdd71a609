"""mix: the sentiment train set mixed with instructions at a share from params.

    python stages/mix.py --params params.yaml --sentiment data/prepared/sentiment_train.jsonl \
        --labels data/prepared/labels.json --instructions data/prepared/instructions_train.jsonl --out data/mixed
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.data.splits import write_mix
from lorapipe.io import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--sentiment", type=Path, required=True, help="sentiment training records")
    parser.add_argument("--labels", type=Path, required=True, help="the label set instructify wrote")
    parser.add_argument("--instructions", type=Path, required=True, help="instruction training records")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and stats.json")
    args = parser.parse_args()
    run_stage(
        "mix",
        lambda: write_mix(args.sentiment, args.labels, args.instructions, load_params(args.params).mix, args.out),
    )


if __name__ == "__main__":
    main()

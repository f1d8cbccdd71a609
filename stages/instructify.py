"""instructify: raw tweets and instructions to chat-format train/test splits.

    python stages/instructify.py --params params.yaml --raw data/raw \
        --out-of-sample data/out_of_sample.yaml --out data/prepared
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.data.instructify import instructify
from lorapipe.io import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--raw", type=Path, required=True, help="the fetch stage's data folder")
    parser.add_argument("--out-of-sample", type=Path, required=True, help="the hand-written instructions (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the record files and stats.json")
    args = parser.parse_args()
    run_stage("instructify", lambda: instructify(load_params(args.params), args.raw, args.out, args.out_of_sample))


if __name__ == "__main__":
    main()

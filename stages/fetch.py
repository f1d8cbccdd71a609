"""fetch: raw tweets and instructions into one folder, the base model as safetensors into another.

python stages/fetch.py --params params.yaml --data-out data/raw --model-out models/base
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.io import run_stage
from lorapipe.sources.fetch import fetch_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--data-out", type=Path, required=True, help="folder for the tweets, instructions, manifest")
    parser.add_argument("--model-out", type=Path, required=True, help="folder for the base model")
    args = parser.parse_args()

    run_stage("fetch", lambda: fetch_all(load_params(args.params), args.data_out, args.model_out))


if __name__ == "__main__":
    main()

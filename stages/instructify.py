"""instructify: tweets and instructions from data/raw/ to chat-format splits in data/prepared/."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.instructify import instructify
from lorapipe.io import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--out-of-sample", type=Path, default=Path("data/out_of_sample.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data/prepared"))
    args = parser.parse_args()
    run_stage("instructify", lambda: instructify(load_params(args.params), args.raw, args.out, args.out_of_sample))


if __name__ == "__main__":
    main()

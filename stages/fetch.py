"""fetch: raw tweets and instructions into data/raw/, the base model as safetensors into models/base/."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.fetching import fetch_data, fetch_model
from lorapipe.io import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data-out", type=Path, default=Path("data/raw"))
    parser.add_argument("--model-out", type=Path, default=Path("models/base"))
    args = parser.parse_args()

    def body() -> None:
        params = load_params(args.params)
        fetch_data(params.data, args.data_out)
        fetch_model(params.model, args.model_out)

    run_stage("fetch", body)


if __name__ == "__main__":
    main()

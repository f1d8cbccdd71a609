"""train_sentiment / train_mixed: a LoRA adapter on one chat-format train file.

Runs as is on one device, or under ``accelerate launch stages/train.py ...`` on several.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.io import run_stage
from lorapipe.training import TrainJob, train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="the model's name: sentiment or mixed")
    parser.add_argument("--train-file", type=Path, required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    args = parser.parse_args()
    job = TrainJob(
        name=args.name,
        base_model=args.base,
        train_file=args.train_file,
        adapter_out=Path("models/adapters") / args.name,
        checkpoints=Path("models/checkpoints") / args.name,
        live_dir=Path("dvclive") / args.name,
        summary_out=Path("metrics") / f"train_{args.name}.json",
    )

    def body() -> None:
        params = load_params(args.params)
        train_adapter(job, params.lora, params.train)

    run_stage(f"train_{args.name}", body)


if __name__ == "__main__":
    main()

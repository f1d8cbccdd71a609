"""train_sentiment / train_mixed: a LoRA adapter on one chat-format train file.

    python stages/train.py --params params.yaml --name sentiment --base models/base \
        --train-file data/prepared/sentiment_train.jsonl --adapter-out models/adapters/sentiment \
        --checkpoints models/checkpoints/sentiment --live-dir dvclive/sentiment \
        --summary metrics/train_sentiment.json --valid-file data/prepared/sentiment_valid.jsonl \
        --labels data/prepared/labels.json --processes 1 --accelerate-config configs/accelerate/ddp.yaml

With --processes above 1 it runs itself under ``accelerate launch`` with that config (DDP, FSDP or ZeRO-3); with
--machines above 1, one such launch per machine, started through Ray (``lorapipe.training.machines``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.io import run_stage
from lorapipe.training.launch import launched, relaunch
from lorapipe.training.machines import relaunch_on_machines
from lorapipe.training.recipe import TrainJob, train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--name", required=True, help="the model's name: sentiment or mixed")
    parser.add_argument("--base", type=Path, required=True, help="the base model folder")
    parser.add_argument("--train-file", type=Path, required=True, help="prompt/completion training records")
    parser.add_argument("--adapter-out", type=Path, required=True, help="the adapter folder to write")
    parser.add_argument("--checkpoints", type=Path, required=True, help="resumable checkpoints (kept across runs)")
    parser.add_argument("--live-dir", type=Path, required=True, help="DVCLive folder for the training curves")
    parser.add_argument("--summary", type=Path, required=True, help="the training summary JSON to write")
    parser.add_argument("--valid-file", type=Path, help="validation records scored every train.eval_steps")
    parser.add_argument("--labels", type=Path, help="the label set of the validation records")
    parser.add_argument("--processes", type=int, required=True, help="training processes (train.processes)")
    parser.add_argument("--accelerate-config", type=Path, required=True, help="used when --processes > 1")
    parser.add_argument("--machines", type=int, required=True, help="machines the processes span (train.machines)")
    args = parser.parse_args()
    job = TrainJob(
        args.name,
        args.base,
        args.train_file,
        args.adapter_out,
        args.checkpoints,
        args.summary,
        args.live_dir,
        args.params,
        args.valid_file,
        args.labels,
        script=Path(__file__),
    )

    def body() -> None:
        params = load_params(args.params)
        if args.machines > 1 and not launched():
            small = [args.params, args.train_file, args.valid_file, args.labels, args.accelerate_config]
            status = relaunch_on_machines(
                args.accelerate_config,
                args.processes,
                args.machines,
                sys.argv,
                shipped=[str(path) for path in small if path is not None],
                present=[str(args.base)],
            )
            if status:
                sys.exit(status)
            return
        if args.processes > 1 and not launched():
            status = relaunch(args.accelerate_config, args.processes, sys.argv)
            if status:
                sys.exit(status)
            return
        train_adapter(job, params.lora, params.train)

    run_stage(f"train_{args.name}", body)


if __name__ == "__main__":
    main()

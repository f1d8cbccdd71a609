"""Training throughput: our train stage against a plain TRL script on the same examples.

    python benchmarks/train_throughput.py --examples 200

Both train the same LoRA (params.yaml's lora and train sections) on the first N records of
data/prepared/sentiment_train.jsonl, on this machine's CPU. Prints non-padding tokens per second for
each, their ratio, and each against the machine's limit (DESIGN.md: ~350 LoRA-training tok/s for
SmolLM2-135M on 2 AVX2 cores at the FMA peak). Run after `dvc repro instructify`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lorapipe.config import load_params
from lorapipe.io import read_jsonl, write_jsonl
from lorapipe.training import TrainJob, train_adapter

HARDWARE_LIMIT_TOK_S = 350.0


def plain_trl(base: Path, rows: list[dict], params, out: Path) -> float:
    """What a TRL user writes from the docs: SFTTrainer + LoraConfig with TRL's defaults on the CPU."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        processing_class=AutoTokenizer.from_pretrained(base),
        train_dataset=dataset,
        args=SFTConfig(
            output_dir=str(out),
            per_device_train_batch_size=params.train.batch_size,
            gradient_accumulation_steps=params.train.gradient_accumulation_steps,
            learning_rate=params.train.learning_rate,
            num_train_epochs=1,
            use_cpu=True,
            include_num_input_tokens_seen="non_padding",
            report_to="none",
            save_strategy="no",
            seed=params.train.seed,
        ),
        peft_config=LoraConfig(
            r=params.lora.r,
            lora_alpha=params.lora.alpha,
            lora_dropout=params.lora.dropout,
            target_modules=params.lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    started = time.perf_counter()
    trainer.train()
    return trainer.state.num_input_tokens_seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--train-file", type=Path, default=Path("data/prepared/sentiment_train.jsonl"))
    args = parser.parse_args()
    params = load_params()
    rows = read_jsonl(args.train_file)[: args.examples]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jsonl(tmp / "train.jsonl", rows)
        job = TrainJob(
            "bench", args.base, tmp / "train.jsonl", tmp / "adapter", tmp / "ckpt", tmp / "live", tmp / "summary.json"
        )
        ours = train_adapter(job, params.lora, params.train.model_copy(update={"save_steps": 10**6}))
        ours_tok_s = ours["tokens_per_second"]
        plain_tok_s = plain_trl(args.base, rows, params, tmp / "plain")
    print(f"examples: {len(rows)}, tokens: {ours['tokens_seen']}")
    print(f"lorapipe train stage : {ours_tok_s:7.1f} tok/s  ({ours_tok_s / HARDWARE_LIMIT_TOK_S:.0%} of the limit)")
    print(f"plain TRL defaults   : {plain_tok_s:7.1f} tok/s  ({plain_tok_s / HARDWARE_LIMIT_TOK_S:.0%} of the limit)")
    print(f"ratio lorapipe / plain TRL: {ours_tok_s / plain_tok_s:.2f}x")


if __name__ == "__main__":
    main()

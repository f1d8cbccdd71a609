"""Training throughput on this machine: the train stage against a bare loop, plain TRL and the arithmetic limit.

    python benchmarks/train_throughput.py --examples 320

Every contender trains the same LoRA (the params file's lora section) on the first N records of the
training file, one pass, batch ``train.batch_size``, bf16 autocast on the CPU, and is timed from its
first to its last optimizer step (model loading and tokenising excluded):

* the train stage (:func:`lorapipe.training.train_adapter`), shared prefix on and off;
* a bare PyTorch + PEFT loop doing the same arithmetic as the stage without a shared prefix, made as
  fast as it honestly can be: batches of similar lengths (all examples sorted by length), the stage's
  cheaper LoRA dropout, LM head on the label positions only, cross-entropy, backward, gradient clipping,
  AdamW and the learning-rate schedule, no Trainer;
* TRL's SFTTrainer as its documentation shows it (prompt/completion records, bf16, defaults otherwise).

It prints examples/s and non-padding tokens/s of each, their ratios, and the limit this CPU's arithmetic
puts on LoRA training (from its flags, stated with the assumptions). Run after `dvc repro instructify`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from lorapipe.config import load_params
from lorapipe.io import write_jsonl
from lorapipe.label_head import use_mask_dropout
from lorapipe.modeling import choose_hardware, load_causal_lm, load_tokenizer
from lorapipe.records import read_records
from lorapipe.training import TrainJob, lora_config, train_adapter


def cpu_limit(model, tokens_per_example: float, label_tokens: float) -> tuple[float, str]:
    """LoRA-training tokens/s at this CPU's peak FMA rate, and the assumptions behind it."""
    flags = set(re.findall(r"\w+", Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]))
    mhz = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text()).group(1))
    cores = os.cpu_count() or 1
    # Two 256-bit FMA pipes: 16 fp32 FMAs (32 FLOPs) a cycle; AVX-512 on Zen 4 runs through the same pipes.
    fp32_per_cycle = 32 if {"fma", "avx2"} <= flags else 8
    bf16 = "amx_bf16" in flags or "avx512_bf16" in flags
    per_cycle = fp32_per_cycle * (2 if bf16 else 1)  # a BF16 dot product does two multiply-adds per fp32 lane
    peak = cores * mhz * 1e6 * per_cycle
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    head = model.get_output_embeddings().weight.numel()
    # Frozen weights: forward 2 FLOPs per weight, backward 2 more (input gradients only); head on labels only.
    per_example = 4 * linear * tokens_per_example + 4 * head * label_tokens
    seen = ", ".join(sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}))
    assumed = (
        f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOPs/cycle "
        f"({'bf16 dot products' if bf16 else 'fp32 FMA'}; flags: {seen}) "
        f"= {peak / 1e9:.0f} GFLOP/s; {per_example / tokens_per_example / 1e9:.2f} GFLOP per token"
    )
    return peak / per_example * tokens_per_example, assumed


def encode(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer, prompt length) per record, as the chat template renders them."""
    encoded = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        encoded.append(
            (
                tokenizer(full, add_special_tokens=False)["input_ids"],
                len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
            )
        )
    return encoded


def bare_loop(base: Path, rows: list[dict], params) -> dict:
    """The same arithmetic as the train stage without a shared prefix, and nothing else."""
    from peft import get_peft_model
    from transformers import get_scheduler

    hardware = choose_hardware(params.train, cuda=False)
    tokenizer = load_tokenizer(base)
    torch.manual_seed(params.train.seed)
    model = get_peft_model(load_causal_lm(base, attention=hardware.attention), lora_config(params.lora)).train()
    use_mask_dropout(model)
    causal_lm = model.get_base_model()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=params.train.learning_rate, weight_decay=params.train.weight_decay)
    examples = sorted(encode(tokenizer, rows), key=lambda example: len(example[0]))  # the least padding
    size = params.train.batch_size
    steps = -(-len(examples) // size)
    schedule = get_scheduler(params.train.lr_scheduler, optimizer, math.ceil(params.train.warmup_ratio * steps), steps)
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(examples), size):
        batch = examples[start : start + size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (tokens_, prompt) in enumerate(batch):
            ids[row, : len(tokens_)], mask[row, : len(tokens_)] = torch.tensor(tokens_), 1
            labels[row, prompt : len(tokens_)] = torch.tensor(tokens_[prompt:])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=hardware.precision == "bf16"):
            hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
            wanted = labels[:, 1:] != -100
            logits = causal_lm.lm_head(hidden[:, :-1][wanted]).float()
            loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][wanted])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)  # as the Trainer does (max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        tokens += int(mask.sum())
    wall = time.perf_counter() - started
    return {"examples_per_second": len(rows) / wall, "tokens_per_second": tokens / wall, "seconds": wall}


def plain_trl(base: Path, rows: list[dict], params, out: Path) -> dict:
    """What a TRL user writes from the docs: SFTTrainer, LoraConfig, bf16 on the CPU, TRL's defaults otherwise."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        processing_class=AutoTokenizer.from_pretrained(base),
        train_dataset=dataset,
        args=SFTConfig(
            output_dir=str(out),
            per_device_train_batch_size=params.train.batch_size,
            learning_rate=params.train.learning_rate,
            num_train_epochs=1,
            use_cpu=True,
            bf16=True,
            include_num_input_tokens_seen="non_padding",
            report_to="none",
            save_strategy="no",
            seed=params.train.seed,
            disable_tqdm=True,
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
    wall = time.perf_counter() - started
    return {
        "examples_per_second": len(rows) / wall,
        "tokens_per_second": trainer.state.num_input_tokens_seen / wall,
        "seconds": wall,
    }


def train_stage(base: Path, train_file: Path, params, out: Path, shared_prefix: bool) -> dict:
    train = params.train.model_copy(update={"save_steps": 10**6, "shared_prefix": shared_prefix, "epochs": 1})
    job = TrainJob("bench", base, train_file, out / "adapter", out / "checkpoints", out / "summary.json")
    summary = train_adapter(job, params.lora, train)
    return {
        "examples_per_second": summary["examples_per_second"],
        "tokens_per_second": summary["tokens_per_second"],
        "seconds": summary["wall_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=320)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--train-file", type=Path, default=Path("data/prepared/sentiment_train.jsonl"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    params = load_params(args.params)
    rows = read_records(args.train_file, limit=args.examples)
    tokenizer = load_tokenizer(args.base)
    encoded = encode(tokenizer, rows)
    tokens_per_example = sum(len(ids) for ids, _ in encoded) / len(encoded)
    label_tokens = sum(len(ids) - prompt for ids, prompt in encoded) / len(encoded)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jsonl(tmp / "train.jsonl", rows)
        results["train stage, shared prefix"] = train_stage(args.base, tmp / "train.jsonl", params, tmp / "a", True)
        results["train stage, no shared prefix"] = train_stage(args.base, tmp / "train.jsonl", params, tmp / "b", False)
        results["bare PyTorch + PEFT loop"] = bare_loop(args.base, rows, params)
        results["plain TRL SFTTrainer, bf16"] = plain_trl(args.base, rows, params, tmp / "trl")
    limit, assumed = cpu_limit(load_causal_lm(args.base), tokens_per_example, label_tokens)
    bare = results["bare PyTorch + PEFT loop"]["examples_per_second"]
    trl = results["plain TRL SFTTrainer, bf16"]["examples_per_second"]
    size = params.train.batch_size
    print(f"\n{len(rows)} examples, {tokens_per_example:.1f} tokens each ({label_tokens:.1f} carry loss), batch {size}")
    print(f"machine limit: {limit:.0f} tokens/s ({limit / tokens_per_example:.2f} examples/s) assuming {assumed}")
    print("(tokens/s counts every non-padding token, also those a shared prefix computes once for the batch)")
    print(f"{'':34} {'examples/s':>10} {'tokens/s':>9} {'vs bare':>8} {'vs TRL':>7} {'of limit':>9}")
    for name, figures in results.items():
        rate = figures["examples_per_second"]
        print(
            f"{name:34} {rate:10.2f} {figures['tokens_per_second']:9.1f} {rate / bare:7.2f}x {rate / trl:6.2f}x "
            f"{figures['tokens_per_second'] / limit:8.0%}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"results": results, "limit_tokens_per_second": limit, "assumed": assumed}, indent=2)
        )


if __name__ == "__main__":
    main()

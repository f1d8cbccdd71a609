"""Training throughput on this machine: the train stage against a bare loop, plain TRL and the arithmetic limit.

    python benchmarks/train_throughput.py --examples 320

Every contender trains the same LoRA (the params file's lora section) on the first N records of the
training file, one pass, batch ``train.batch_size``, in the precision the train stage trains in on this
CPU (``--precision auto``: the stage's own choice, timed here as the stage times it), and is timed from its
first to its last optimizer step (model loading and tokenising excluded):

* the train stage (:func:`lorapipe.training.recipe.train_adapter`), shared prefix on and off;
* a bare PyTorch + PEFT loop doing the same arithmetic as the stage without a shared prefix, made as
  fast as it honestly can be: batches of similar lengths (all examples sorted by length), the stage's
  cheaper LoRA dropout, LM head on the label positions only, cross-entropy, backward, gradient clipping,
  AdamW and the learning-rate schedule, no Trainer;
* TRL's SFTTrainer as its documentation shows it (prompt/completion records, the same precision, defaults
  otherwise).

It prints examples/s and non-padding tokens/s of each, the precision it ran in, their ratios, and the limit
this CPU's arithmetic puts on LoRA training: the frozen weights' matrix products of a batch (forward and input
gradient, 4 FLOPs per weight per token), timed here on the model's own shapes in fp32 and in bf16 (bf16
tensors and bf16 autocast, the better), the faster precision's rate. Run after `dvc repro instructify`.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from lorapipe.config import load_params
from lorapipe.host import shared_cores
from lorapipe.io import write_jsonl
from lorapipe.models.loading import choose_hardware, load_causal_lm, load_tokenizer, store_frozen_linears_in_bf16
from lorapipe.records import read_records
from lorapipe.training.build import lora_config
from lorapipe.training.fitting import tokenize_records
from lorapipe.training.label_head import use_mask_dropout
from lorapipe.training.probe import measure_precision
from lorapipe.training.recipe import TrainJob, train_adapter

MEASURE_SECONDS = 0.25  # per distinct shape and kind: a second or two a kind for a Llama model


def frozen_products(model, tokens: int, label_tokens: int) -> Counter[tuple[int, int, int]]:
    """(rows, out, in) -> count of the frozen weights' matrix products in a batch: each linear on all its tokens,
    the LM head on the label positions only."""
    products = Counter(
        (tokens, *m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    products[(max(1, label_tokens), *model.get_output_embeddings().weight.shape)] += 1
    return products


def product_seconds(rows: int, out: int, inputs: int, kind: str) -> float:
    """Seconds of one frozen linear's forward and input gradient, the best of repeats: ``kind`` fp32, bf16 (tensors)
    or bf16 autocast."""
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    x = torch.randn(rows, inputs, dtype=dtype, requires_grad=True)
    weight = torch.randn(out, inputs, dtype=dtype)
    grad = torch.randn(rows, out, dtype=torch.float32 if kind == "fp32" else torch.bfloat16)

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "bf16 autocast"):
            y = torch.nn.functional.linear(x, weight)
        torch.autograd.grad(y, x, grad)

    run()  # warm-up: kernel selection
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < MEASURE_SECONDS:
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
    return best


def matmul_rates(products: Counter[tuple[int, int, int]]) -> dict[str, float]:
    """GFLOP/s of a batch's frozen matrix products (4 FLOPs per weight per row) in each kind, timed here."""
    flops = sum(4 * rows * out * inputs * count for (rows, out, inputs), count in products.items())
    return {
        kind: flops / sum(count * product_seconds(*shape, kind) for shape, count in products.items()) / 1e9
        for kind in ("fp32", "bf16", "bf16 autocast")
    }


def contenders_precision(requested: str, params, params_file: Path, model, tokenizer, rows) -> tuple[str, str]:
    """The precision every contender trains in, and why: --precision, the params file's pin or the stage's timing."""
    if requested != "auto":
        return requested, "--precision"
    pinned = choose_hardware(params.train, cuda=False).precision
    if pinned != "auto":
        return pinned, f"pinned in {params_file}"
    choice = measure_precision(model, tokenizer, rows, params.lora, params.train)
    timed = ", ".join(f"{name} {rate:.2f}" for name, rate in (choice.rates or {}).items())
    return choice.precision, f"the train stage's choice, timed here ({timed} examples/s, {choice.probe})"


def bare_loop(base: Path, rows: list[dict], params, precision: str) -> dict:
    """The same arithmetic as the train stage without a shared prefix, and nothing else."""
    from peft import get_peft_model
    from transformers import get_scheduler

    hardware = choose_hardware(params.train, cuda=False)
    tokenizer = load_tokenizer(base)
    torch.manual_seed(params.train.seed)
    model = get_peft_model(load_causal_lm(base, attention=hardware.attention), lora_config(params.lora)).train()
    use_mask_dropout(model)
    if precision == "bf16":  # as the stage: frozen weights stored in bf16 once, not cast at every use
        store_frozen_linears_in_bf16(model)
    causal_lm = model.get_base_model()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=params.train.learning_rate, weight_decay=params.train.weight_decay)
    examples = sorted(tokenize_records(tokenizer, rows), key=lambda example: len(example[0]))  # the least padding
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
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
    return {
        "precision": precision,
        "examples_per_second": len(rows) / wall,
        "tokens_per_second": tokens / wall,
        "seconds": wall,
    }


def plain_trl(base: Path, rows: list[dict], params, out: Path, precision: str) -> dict:
    """What a TRL user writes from the docs: SFTTrainer, LoraConfig, ``precision`` on the CPU, TRL's defaults
    otherwise."""
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
            bf16=precision == "bf16",
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
        "precision": precision,
        "examples_per_second": len(rows) / wall,
        "tokens_per_second": trainer.state.num_input_tokens_seen / wall,
        "seconds": wall,
    }


def train_stage(base: Path, train_file: Path, params, out: Path, shared_prefix: bool, precision: str) -> dict:
    update = {"save_steps": 10**6, "shared_prefix": shared_prefix, "epochs": 1, "precision": precision}
    train = params.train.model_copy(update=update)
    job = TrainJob("bench", base, train_file, out / "adapter", out / "checkpoints", out / "summary.json")
    summary = train_adapter(job, params.lora, train)
    return {
        "precision": summary["precision"],
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
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="every contender's precision; auto: the train stage's (its pin in the params file, else its timing)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    params = load_params(args.params)
    rows = read_records(args.train_file, limit=args.examples)
    tokenizer = load_tokenizer(args.base)
    encoded = tokenize_records(tokenizer, rows)
    tokens_per_example = sum(len(ids) for ids, _ in encoded) / len(encoded)
    label_tokens = sum(len(ids) - prompt for ids, prompt in encoded) / len(encoded)
    size = params.train.batch_size
    model = load_causal_lm(args.base, attention=choose_hardware(params.train, cuda=False).attention)
    tokens = round(size * tokens_per_example)
    products = frozen_products(model, tokens, round(size * label_tokens))
    per_token = sum(4 * r * o * i * count for (r, o, i), count in products.items()) / tokens
    with shared_cores():  # the thread count the stage trains with
        threads = torch.get_num_threads()
        kinds = matmul_rates(products)
        precision, why = contenders_precision(args.precision, params, args.params, model, tokenizer, rows)
    del model
    bf16_kind = max(("bf16", "bf16 autocast"), key=kinds.__getitem__)
    rates = {"fp32": kinds["fp32"], "bf16": kinds[bf16_kind]}
    fastest = max(rates, key=rates.__getitem__)
    limit = rates[fastest] * 1e9 / per_token
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jsonl(tmp / "train.jsonl", rows)
        for name, shared in (("train stage, shared prefix", True), ("train stage, no shared prefix", False)):
            results[name] = train_stage(args.base, tmp / "train.jsonl", params, tmp / str(shared), shared, precision)
        results["bare PyTorch + PEFT loop"] = bare_loop(args.base, rows, params, precision)
        results["plain TRL SFTTrainer"] = plain_trl(args.base, rows, params, tmp / "trl", precision)
    bare = results["bare PyTorch + PEFT loop"]["examples_per_second"]
    trl = results["plain TRL SFTTrainer"]["examples_per_second"]
    print(f"\n{len(rows)} examples, {tokens_per_example:.1f} tokens each ({label_tokens:.1f} carry loss), batch {size}")
    print(
        f"matrix products on this CPU (stage shapes, {threads} threads): fp32 {rates['fp32']:.0f} GFLOP/s, "
        f"bf16 {rates['bf16']:.0f} GFLOP/s (bf16 tensors {kinds['bf16']:.0f}, autocast {kinds['bf16 autocast']:.0f}); "
        f"limit from {fastest}: {limit:.0f} tokens/s ({limit / tokens_per_example:.2f} examples/s) "
        f"at {per_token / 1e9:.2f} GFLOP per token"
    )
    print(f"precision of every contender: {precision} ({why})")
    print("(tokens/s counts every non-padding token, also those a shared prefix computes once for the batch)")
    print(f"{'':34} {'precision':>9} {'examples/s':>10} {'tokens/s':>9} {'vs bare':>8} {'vs TRL':>7} {'of limit':>9}")
    for name, figures in results.items():
        rate = figures["examples_per_second"]
        print(
            f"{name:34} {figures['precision']:>9} {rate:10.2f} {figures['tokens_per_second']:9.1f} "
            f"{rate / bare:7.2f}x {rate / trl:6.2f}x {figures['tokens_per_second'] / limit:8.0%}"
        )
    if args.json:
        measured = {
            "matmul_gflops": kinds,
            "threads": threads,
            "limit_precision": fastest,
            "limit_tokens_per_second": limit,
            "gflop_per_token": per_token / 1e9,
            "precision": precision,
            "precision_reason": why,
        }
        args.json.write_text(json.dumps({"results": results, **measured}, indent=2))


if __name__ == "__main__":
    main()

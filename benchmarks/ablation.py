"""Ablation: each speed-up that rests on a private API or replaces a library object's method, against the path
without it, on this machine.

    python benchmarks/ablation.py --out benchmarks/results/ablation.json [--tweets 200] [--rounds 2]

Evaluation (the base model, as eval_base scores it): each contender runs label scoring with whole answers on the
first ``--tweets`` held-out tweets and answers every held-out and out-of-sample instruction, the two ways taking
turns in one process (``--rounds`` each); the seconds are scaled to the whole test set and compared with the
stage's own seconds (``metrics/base.json``). Training: each contender trains ``--train-steps`` steps of the tweet
(or mixed) set in a fresh process, the two ways taking turns; the saving is compared with the train stage's own
wall time (``metrics/train_sentiment.json``). A speed-up stays only where it saves at least 5 % of its stage's
time, or the memory that keeps a stage under 3 GiB. Run after `dvc repro`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorapipe import decoding
from lorapipe.config import load_params
from lorapipe.evaluation import kernels
from lorapipe.evaluation.evaluate import load_instructions, load_out_of_sample, load_sentiment
from lorapipe.host import bound_onednn_cache
from lorapipe.labels import read_labels
from lorapipe.models.loading import load_for_inference, load_tokenizer

KEEP_SHARE = 0.05  # a speed-up stays where it saves at least this share of its stage's time


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with its family, model and the bf16 / AMX instructions it has."""
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    if "model name" not in info:
        return platform.processor()
    flags = set(info.get("flags", "").split())
    bf16 = "AVX-512 BF16" if "avx512_bf16" in flags else "no bf16 instructions"
    amx = "AMX" if "amx_tile" in flags else "no AMX"
    family = f"family {info.get('cpu family')} model {info.get('model')}"
    return f"{info['model name']}, {family}, {bf16}, {amx} ({os.cpu_count()} cores)"


def eval_model(base: Path, kernel: str):
    """The base model as the eval stage prepares it, with ``kernel`` pinned."""
    model = load_for_inference(base)
    kernels.use_faster_fp32_kernel(model, "fp32", pinned=kernel)
    return model


def eval_seconds(model, tokenizer, data, params, during: Callable[[], contextlib.AbstractContextManager]) -> dict:
    tweets, labels, prompts = data
    with torch.inference_mode(), during():
        started = time.perf_counter()
        decoding.predict_sentiment(
            model, tokenizer, [r["prompt"] for r in tweets], labels, params.batch_size,
            params.sentiment_max_new_tokens, max_prompt_tokens=params.max_prompt_tokens,
        )  # fmt: skip
        middle = time.perf_counter()
        decoding.generate_answers(
            model, tokenizer, prompts, params.generation_batch_size, params.max_new_tokens,
            max_prompt_tokens=params.max_prompt_tokens,
        )  # fmt: skip
        return {"tweets": middle - started, "generation": time.perf_counter() - middle}


def evaluation_ablation(args, params, stage: dict) -> list[dict]:
    labels = read_labels(args.prepared / "labels.json").labels
    all_tweets = load_sentiment(args.prepared / "sentiment_test.jsonl", labels)
    tweets = all_tweets[: args.tweets]
    prompts = [r["prompt"] for r in load_instructions(args.prepared / "instructions_test.jsonl")]
    prompts += [r["prompt"] for r in load_out_of_sample(args.prepared / "out_of_sample.jsonl")]
    tokenizer = load_tokenizer(args.base, padding_side="left")
    data = (tweets, labels, prompts)
    stage_seconds = stage["seconds"]["sentiment"] + stage["seconds"]["generation"] + stage["seconds"]["text_scores"]
    scale = len(all_tweets) / len(tweets)
    nothing = contextlib.nullcontext
    # Prompt-lookup drafts, the fused gated MLP, the grouped decode-step attention and the shared-KV SDPA attention
    # were ablated here too and removed (docs/ablation.md); what is left to measure:
    contenders = [  # name, model and patch with it, model and patch without it
        ("oneDNN reordered linear (against MKL)", eval_model(args.base, "onednn"), nothing,
         eval_model(args.base, "mkl"), nothing),
    ]  # fmt: skip
    results = []
    for name, with_model, with_patch, without_model, without_patch in contenders:
        runs: dict[str, list[dict]] = {"with": [], "without": []}
        eval_seconds(with_model, tokenizer, data, params, with_patch)  # warm-up: kernels, first allocations
        for _ in range(args.rounds):
            runs["with"].append(eval_seconds(with_model, tokenizer, data, params, with_patch))
            runs["without"].append(eval_seconds(without_model, tokenizer, data, params, without_patch))
        best = {way: {part: min(r[part] for r in rs) for part in rs[0]} for way, rs in runs.items()}
        whole = {way: b["tweets"] * scale + b["generation"] for way, b in best.items()}
        results.append(verdict(name, "eval_base", whole["without"] - whole["with"], stage_seconds, best))
        print(json.dumps(results[-1]), flush=True)
    return results


TRAIN_ARM = """
import json, sys
from pathlib import Path
from lorapipe.config import load_params
from lorapipe.training import recipe, trainer
from lorapipe.training.recipe import TrainJob, train_adapter
name, way, params_file, train_file, base, out, steps = sys.argv[1:8]
params = load_params(params_file)
train = params.train.model_copy(update={"max_steps": int(steps), "cpu_precision": sys.argv[8], "eval_steps": 10**6,
                                        "shared_prefix": name != "label head"})
if way == "without":
    if name == "label head":
        recipe.use_label_head = lambda *args, **kwargs: False
    elif name == "MaskDropout":
        trainer.use_mask_dropout = lambda model: None
    elif name == "glibc allocator settings":
        recipe.keep_freed_memory = lambda: False
job = TrainJob("ablation", Path(base), Path(train_file), Path(out) / "adapter", Path(out) / "checkpoints",
               Path(out) / "summary.json")
summary = train_adapter(job, params.lora, train)
print("RESULT " + json.dumps({"seconds": summary["wall_seconds"], "peak_rss_mib": summary["peak_rss_mib"]}))
"""


def train_run(name: str, way: str, args, train_file: Path, precision: str, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if name == "oneDNN primitive cache bound" and way == "without":
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "1024"  # oneDNN's own default
    command = [sys.executable, "-c", TRAIN_ARM, name, way, str(args.params), str(train_file), str(args.base), str(out),
               str(args.train_steps), precision]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} ({way}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def training_ablation(args, stage: dict, out: Path) -> list[dict]:
    precision = stage["precision"]
    contenders = [
        ("label head", args.prepared / "sentiment_train.jsonl"),
        ("MaskDropout", args.prepared / "sentiment_train.jsonl"),
        ("glibc allocator settings", args.prepared / "sentiment_train.jsonl"),
        ("oneDNN primitive cache bound", args.mixed),
    ]
    results = []
    for name, train_file in contenders:
        runs: dict[str, list[dict]] = {"with": [], "without": []}
        for round_ in range(args.rounds):
            for way in ("with", "without"):
                runs[way].append(train_run(name, way, args, train_file, precision, out / f"{name}-{way}-{round_}"))
        best = {way: min(r["seconds"] for r in rs) for way, rs in runs.items()}
        peak = {way: max(r["peak_rss_mib"] for r in rs) for way, rs in runs.items()}
        steps = stage["steps"] / args.train_steps  # the saving of these steps, scaled to the stage's
        result = verdict(name, "train", (best["without"] - best["with"]) * steps, stage["wall_seconds"], best)
        result["peak_rss_mib"] = peak
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def verdict(name: str, stage: str, saved: float, stage_seconds: float, measured: dict) -> dict:
    share = saved / stage_seconds
    return {
        "speed_up": name,
        "stage": stage,
        "saved_seconds_per_stage": round(saved, 1),
        "stage_seconds": round(stage_seconds, 1),
        "share_of_stage": round(share, 3),
        "pays_its_way": share >= KEEP_SHARE,
        "measured": json.loads(json.dumps(measured, default=float), parse_float=lambda v: round(float(v), 2)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--mixed", type=Path, default=Path("data/mixed/train.jsonl"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics"), help="the stages' own metrics files")
    parser.add_argument("--tweets", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--only", choices=("eval", "train"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    bound_onednn_cache()
    params = load_params(args.params).eval
    results: list[dict] = []
    if args.only != "train":
        results += evaluation_ablation(args, params, json.loads((args.metrics / "base.json").read_text()))
    if args.only != "eval":
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            results += training_ablation(
                args, json.loads((args.metrics / "train_sentiment.json").read_text()), Path(scratch)
            )
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "keep_share": KEEP_SHARE, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        keep = "keep" if r["pays_its_way"] else "remove"
        saved, total, share = r["saved_seconds_per_stage"], r["stage_seconds"], r["share_of_stage"]
        print(f"{r['speed_up']:45s} {r['stage']:10s} saves {saved:6.1f} s of {total:6.1f} ({share:+.1%}): {keep}")


if __name__ == "__main__":
    main()

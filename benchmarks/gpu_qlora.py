"""The train stage's code on a CUDA GPU: 4-bit nf4 QLoRA, paged AdamW, fp16, on randomly initialised Mistral models.

    python benchmarks/gpu_qlora.py --out gpu_results.json [--seven-b]

Runs :func:`lorapipe.training.recipe.train_adapter` with study A's LoRA and training settings (the seeds': r 8,
alpha 32, q/k/v/o, batch 4, accumulation 2, lr 2e-4, paged_adamw_32bit, fp16) for a few steps on
synthetic tweet records, first on a small Mistral-architecture model (shared prefix on and off), then,
with --seven-b, on the real Mistral-7B-v0.1 shapes (random fp16 weights written as safetensors shards,
loaded in 4 bits). Records tokens per second and peak GPU memory of each run. Needs no network.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import NEGATIVE, POSITIVE, build_tiny_tokenizer  # noqa: E402
from lorapipe.config import load_params  # noqa: E402
from lorapipe.data.prompts import sentiment_prompt  # noqa: E402
from lorapipe.io import write_jsonl  # noqa: E402
from lorapipe.records import record  # noqa: E402
from lorapipe.training.recipe import TrainJob, train_adapter  # noqa: E402

SMALL = {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 8, "num_attention_heads": 16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # a CPU runs the same code as a dry run (plain LoRA)
MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32}


def mistral_config(shape: dict, tokenizer):
    from transformers import MistralConfig

    return MistralConfig(
        **shape,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
        sliding_window=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def write_random_model(config, tokenizer, out: Path, shard_bytes: int = 4 << 30) -> Path:
    """Random fp16 weights of ``config`` as safetensors shards made on the GPU, without building the model."""
    from safetensors.torch import save_file
    from transformers import MistralForCausalLM

    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in MistralForCausalLM(config).state_dict().items()}
    out.mkdir(parents=True)
    shards, current, size, index = [], {}, 0, {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.float16)
        else:
            tensor = (torch.randn(shape, dtype=torch.float16, device=DEVICE) * 0.02).cpu()
        current[name] = tensor
        size += tensor.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * 2 for shard in shards for t in shard.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def synthetic_tweets(prompt, count: int, seed: int = 0) -> list[dict]:
    """Tweet records of 5 to 25 random words of the tiny corpus, half positive, under the study's prompt."""
    rng = random.Random(seed)
    words = " ".join(POSITIVE + NEGATIVE).split()
    rows = []
    for i in range(count):
        label = "positive" if i % 2 else "negative"
        text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 25)))
        rows.append(record(sentiment_prompt(text, prompt, ("positive", "negative")), label, label=label, text=text))
    return rows


def run(name: str, base: Path, work: Path, params, steps: int, shared_prefix: bool) -> dict:
    train = params.train.model_copy(update={"max_steps": steps, "save_steps": 10**6, "shared_prefix": shared_prefix})
    out = work / name
    job = TrainJob(name, base, work / "train.jsonl", out / "adapter", out / "checkpoints", out / "summary.json")
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = train_adapter(job, params.lora, train)
    summary["stage_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({name: summary}), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seven-b", action="store_true", help="also train on the real Mistral-7B shapes")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    import transformers
    import trl

    results: dict = {
        "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (CPU dry run)",
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "runs": {},
    }
    if DEVICE == "cuda":
        import bitsandbytes

        results["versions"]["bitsandbytes"] = bitsandbytes.__version__
    params = load_params(ROOT / "profiles" / "study-a-mistral-7b.yaml")
    tokenizer = build_tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = synthetic_tweets(params.prompt, 600)
        write_jsonl(work / "train.jsonl", rows)
        texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
        results["tokens_per_example"] = sum(len(ids) for ids in tokenizer(texts)["input_ids"]) / len(rows)
        small = write_random_model(mistral_config(SMALL, tokenizer), tokenizer, work / "small")
        run("warm-up", small, work, params, 3, True)  # CUDA context, cuBLAS and bitsandbytes kernels: not timed
        models = [("small", small)]
        if args.seven_b:
            started = time.perf_counter()
            big = write_random_model(mistral_config(MISTRAL_7B, tokenizer), tokenizer, work / "mistral-7b-shapes")
            results["seven_b_write_seconds"] = round(time.perf_counter() - started, 1)
            models.append(("mistral-7b-shapes", big))
        for label, base in models:
            for shared in (True, False):
                name = f"{label}-shared-prefix-{'on' if shared else 'off'}"
                results["runs"][name] = run(name, base, work, params, args.steps, shared)
                args.out.write_text(json.dumps(results, indent=2))
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

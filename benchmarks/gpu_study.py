"""Study A's whole DAG with nothing from a hub: every stage of `dvc repro`, timed, on CUDA or (as a dry run) a CPU.

    python benchmarks/gpu_study.py --out benchmarks/results/gpu_study_h200.json [--examples 320] [--work DIR]
    python benchmarks/gpu_study.py --cpu --out /tmp/study.json --examples 24        # the CPU mode (tests run it)

Builds what study A's profile fetches, locally: a random-weight Mistral-7B-shaped model (on the CPU a two-layer
Mistral) written as safetensors with a tokenizer, a parquet stand-in of carblacac/twitter-sentiment-analysis's
columns (text, feeling 0/1) and an Alpaca-shaped JSON file. Then copies the repository's tracked files into a
fresh Git + DVC folder with study A's profile pointed at them (local sources, fewer examples) and runs every
stage in DAG order, one `dvc repro --single-item` each: QLoRA training of both adapters (plain LoRA on a
CPU), evaluation of the base and both adapters on their 4-bit base (label scoring, generation, text scores),
the report. Records per-stage seconds, the stages' own figures (training tokens/s, evaluation throughput)
and the peak GPU memory sampled with nvidia-smi while each stage runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from conftest import NEGATIVE, POSITIVE, build_tiny_tokenizer, copy_tracked_files  # noqa: E402

STAGES = [
    "validate",
    "fetch",
    "instructify",
    "mix",
    "train_sentiment",
    "train_mixed",
    "eval_base",
    "eval_all",
    "report",
]
TINY_MISTRAL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
FILLER = [
    "the",
    "a",
    "my",
    "this",
    "that",
    "today",
    "again",
    "really",
    "just",
    "so",
    "very",
    "car",
    "ride",
    "day",
    "phone",
    "game",
    "movie",
]


def write_tweets(path: Path, count: int, seed: int = 0) -> Path:
    """carblacac's columns: text, feeling (0 negative, 1 positive), tweets of 6 to 30 words."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    texts, feelings = [], []
    for i in range(count):
        feeling = i % 2
        words = (POSITIVE if feeling else NEGATIVE)[i % 6].split()
        texts.append(" ".join(words + [rng.choice(FILLER) for _ in range(rng.randint(4, 28))]))
        feelings.append(feeling)
    pq.write_table(pa.table({"text": texts, "feeling": feelings}), path)
    return path


def write_instructions(path: Path, count: int, seed: int = 1) -> Path:
    """tatsu-lab/alpaca's fields: instruction, input (often empty), output."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        answer = " ".join(rng.choice(FILLER) for _ in range(rng.randint(10, 60)))
        rows.append(
            {"instruction": f"Describe item {i} in a few words.", "input": "" if i % 3 else "a car", "output": answer}
        )
    path.write_text(json.dumps(rows))
    return path


def write_model(out: Path, cuda: bool) -> Path:
    """Mistral-7B shapes with random fp16 weights on CUDA (made on the GPU); a two-layer Mistral on a CPU."""
    from gpu_qlora import MISTRAL_7B, mistral_config, write_random_model

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None  # study A's profile supplies the chat template, as for the real base model
    if cuda:
        return write_random_model(mistral_config(MISTRAL_7B, tokenizer), tokenizer, out)
    from transformers import MistralForCausalLM

    config = mistral_config(TINY_MISTRAL, tokenizer)
    config.num_key_value_heads, config.vocab_size = 2, len(tokenizer)
    MistralForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def study_params(model: Path, tweets: Path, instructions: Path, examples: int, cuda: bool) -> dict:
    params = yaml.safe_load((ROOT / "profiles" / "study-a-mistral-7b.yaml").read_text())
    params["model"].update(name="Mistral-7B-shaped (random weights)", source={"kind": "local", "path": str(model)})
    params["data"]["tweets"]["source"] = {"kind": "local", "path": str(tweets)}
    params["data"]["instructions"]["source"] = {"kind": "local", "path": str(instructions)}
    params["data"]["split"].update(
        train_size=examples,
        valid_size=max(8, examples // 10),
        test_size=max(8, examples // 2),
        instruction_test_size=max(4, examples // 20),
    )
    params["mix"]["size"] = examples
    params["train"].update(eval_steps=max(1, examples // 16), save_steps=10**6, logging_steps=1)
    params["eval"].update(max_new_tokens=64 if cuda else 8, sentiment_max_new_tokens=8)
    if not cuda:
        params["train"].update(batch_size=4, gradient_accumulation_steps=2, max_length=256)
        params["eval"].update(batch_size=8, generation_batch_size=4, adapter_base="merged")
    return params


def build_repository(work: Path, params: dict) -> Path:
    """A Git + DVC copy of the repository's tracked files with ``params`` as params.yaml."""
    repo = copy_tracked_files(work / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "study"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True, env=environment())
    return repo


def environment() -> dict:
    identity = {
        "GIT_AUTHOR_NAME": "b",
        "GIT_AUTHOR_EMAIL": "b@localhost",
        "GIT_COMMITTER_NAME": "b",
        "GIT_COMMITTER_EMAIL": "b@localhost",
    }
    return {
        **os.environ,
        **identity,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


class GPUMemory:
    """The most GPU memory in use (MiB, all processes) while the block runs, sampled with nvidia-smi."""

    def __init__(self, enabled: bool):
        self.enabled, self.peak, self._stop = enabled, None, threading.Event()

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            done = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode == 0:
                used = max(int(v) for v in done.stdout.split())
                self.peak = max(self.peak or 0, used)
            self._stop.wait(0.5)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()


def run_stages(repo: Path, cuda: bool) -> dict:
    results = {}
    for stage in STAGES:
        started = time.perf_counter()
        with GPUMemory(cuda) as memory:
            done = subprocess.run(
                ["dvc", "repro", "--single-item", stage],
                cwd=repo,
                env=environment(),
                capture_output=True,
                text=True,
                check=False,
            )
        seconds = round(time.perf_counter() - started, 1)
        if done.returncode != 0:
            raise SystemExit(f"stage {stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        results[stage] = {"seconds": seconds, "peak_gpu_mib": memory.peak, **stage_figures(repo, stage)}
        print(json.dumps({stage: results[stage]}), flush=True)
    return results


def stage_figures(repo: Path, stage: str) -> dict:
    """What the stage measured itself: training throughput and memory, evaluation throughput."""
    metrics = repo / "metrics"
    if stage.startswith("train_"):
        summary = json.loads((metrics / f"{stage}.json").read_text())
        keep = (
            "examples",
            "steps",
            "tokens_seen",
            "tokens_per_second",
            "examples_per_second",
            "wall_seconds",
            "peak_gpu_memory_mib",
            "peak_rss_mib",
            "precision",
            "quantized_4bit",
            "device",
        )
        return {k: summary.get(k) for k in keep}
    names = {"eval_base": ["base"], "eval_all": ["sentiment", "mixed"]}.get(stage, [])
    figures = {}
    for name in names:
        scores = json.loads((metrics / f"{name}.json").read_text())
        figures[name] = {
            "seconds": scores["seconds"],
            "speed": scores["speed"],
            "peak_rss_mib": scores["peak_rss_mib"],
            "scored_on": scores.get("scored_on"),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=320, help="training tweets (and mixed records)")
    parser.add_argument("--work", type=Path, help="keep the study here (default: a folder beside --out)")
    parser.add_argument("--cpu", action="store_true", help="the CPU mode: a two-layer Mistral, plain LoRA")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    work = args.work or args.out.parent / f"{args.out.stem}-work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.perf_counter()
    model = write_model(work / "mistral", cuda)
    tweets = write_tweets(work / "tweets.parquet", 4 * args.examples)
    instructions = write_instructions(work / "alpaca.json", max(200, args.examples))
    setup_seconds = round(time.perf_counter() - started, 1)
    repo = build_repository(work, study_params(model, tweets, instructions, args.examples, cuda))
    stages = run_stages(repo, cuda)
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run: tiny Mistral, plain LoRA)",
        "examples": args.examples,
        "setup_seconds": setup_seconds,
        "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1),
        "stages": stages,
        "report": (repo / "report" / "report.md").is_file(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}: {result['total_seconds']} s over {len(stages)} stages")


if __name__ == "__main__":
    main()

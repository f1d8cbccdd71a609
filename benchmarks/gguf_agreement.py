"""Does the exported GGUF answer as the adapter does? Label-scoring predictions on held-out tweets, four ways.

    python benchmarks/gguf_agreement.py [--adapter models/adapters/sentiment] [--tweets 200]

(a) the base model with the adapter unmerged (PEFT), (b) the merged safetensors export, (c) the F16 GGUF export
read back with transformers' GGUF loader, (d) the Q8_0 GGUF the same way. Each scores the first ``--tweets``
held-out tweets by label likelihood in fp32 (as the evaluation does); the benchmark prints how many of (b), (c)
and (d)'s labels equal (a)'s, the accuracy of each, and the exported files' sizes, and writes them as JSON to
``--out``. Run after `dvc repro` (it needs the prepared data and the adapters).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorapipe.decoding import score_labels  # noqa: E402
from lorapipe.labels import read_labels  # noqa: E402
from lorapipe.models.loading import load_causal_lm, load_tokenizer, tokenizer_dir  # noqa: E402
from lorapipe.records import read_records  # noqa: E402
from lorapipe.release.merged import export_merged  # noqa: E402


def predictions(model, tokenizer, conversations, labels, batch_size: int) -> list[str]:
    scores = score_labels(model.eval(), tokenizer, conversations, labels, batch_size)
    return [max(score, key=score.get) for score in scores]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--adapter", type=Path, default=Path("models/adapters/sentiment"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--tweets", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gguf_agreement.json")
    args = parser.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    labels = read_labels(args.prepared / "labels.json").labels
    rows = read_records(args.prepared / "sentiment_test.jsonl")[: args.tweets]
    conversations, actual = [r["prompt"] for r in rows], [r["label"] for r in rows]
    tokenizer = load_tokenizer(tokenizer_dir(args.base, args.adapter))
    runs: dict[str, dict] = {}

    def record(name: str, model, file: Path | None = None) -> None:
        started = time.perf_counter()
        predicted = predictions(model, tokenizer, conversations, labels, args.batch_size)
        runs[name] = {
            "predicted": predicted,
            "accuracy": round(sum(p == a for p, a in zip(predicted, actual, strict=True)) / len(actual), 3),
            "seconds": round(time.perf_counter() - started, 1),
            **({"file_mib": round(file.stat().st_size / 2**20, 1)} if file else {}),
        }
        print(name, {k: v for k, v in runs[name].items() if k != "predicted"}, flush=True)

    record("adapter (unmerged)", PeftModel.from_pretrained(load_causal_lm(args.base), args.adapter))
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged"
        export_merged(args.base, args.adapter, merged)
        record("merged safetensors", AutoModelForCausalLM.from_pretrained(merged), merged / "model.safetensors")
        for gguf_type in ("f16", "q8_0"):
            folder = Path(tmp) / gguf_type
            written = export_merged(args.base, args.adapter, folder, gguf_type=gguf_type)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=written["file"], dtype=torch.float32)
            record(f"GGUF {written['type']} (read back)", model, folder / written["file"])
    reference = runs["adapter (unmerged)"]["predicted"]
    summary = {
        "adapter": str(args.adapter),
        "tweets": len(rows),
        "runs": {
            name: {
                **{k: v for k, v in run.items() if k != "predicted"},
                "agree_with_adapter": sum(p == r for p, r in zip(run["predicted"], reference, strict=True)),
            }
            for name, run in runs.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    for name, run in summary["runs"].items():
        print(f"{name:28s} {run['agree_with_adapter']}/{len(rows)} agree, accuracy {run['accuracy']:.3f}")


if __name__ == "__main__":
    main()

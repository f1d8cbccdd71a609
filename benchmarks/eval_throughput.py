"""Evaluation cost on this machine: label scoring and generation, fp32 against bf16 autocast, before and after.

    python benchmarks/eval_throughput.py [--adapter models/adapters/sentiment] [--tweets 1000]

Label scoring: the held-out tweets scored in fp32 and in bf16 autocast (batch ``eval.batch_size``): tweets/s,
accuracy, and how many labels the precision changed. Both ways (scores and whole greedy answers, up to
``eval.sentiment_max_new_tokens``, as eval runs them): tweets/s and how many answers name several labels.
Generation: the held-out and out-of-sample
instructions answered the way eval_base/eval_all did before (fp32, batches of 20, the two sets apart)
and the way they do now (``eval.precision``, ``eval.generation_batch_size``, one length-sorted run):
seconds, new tokens/s and how many answers differ. Run after `dvc repro` (it needs the prepared data).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from lorapipe.config import load_params
from lorapipe.decoding import generate_answers, predict_sentiment
from lorapipe.evaluation.evaluate import load_instructions, load_out_of_sample, load_sentiment
from lorapipe.labels import read_labels
from lorapipe.models.loading import inference_precision, load_for_inference, load_tokenizer, tokenizer_dir


def timed(work):
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--tweets", type=int, default=1000)
    args = parser.parse_args()
    params = load_params(args.params).eval
    model = load_for_inference(args.base, args.adapter)
    tokenizer = load_tokenizer(tokenizer_dir(args.base, args.adapter), padding_side="left")
    labels = read_labels(args.prepared / "labels.json").labels
    tweets = load_sentiment(args.prepared / "sentiment_test.jsonl", labels, args.tweets)
    prompts = [r["prompt"] for r in tweets]
    print(f"model: {args.base}{' + ' + str(args.adapter) if args.adapter else ''}, {torch.get_num_threads()} threads")

    scored = {}
    for precision in ("fp32", "bf16"):
        with inference_precision(precision, model.device):
            predictions, seconds = timed(
                lambda: predict_sentiment(model, tokenizer, prompts, labels, params.batch_size, 1)
            )
        chosen = [p.score_label for p in predictions]
        accuracy = sum(label == r["label"] for label, r in zip(chosen, tweets, strict=True)) / len(tweets)
        scored[precision] = chosen
        print(f"label scoring {precision}: {len(tweets) / seconds:6.1f} tweets/s, accuracy {accuracy:.4f}")
    changed = sum(a != b for a, b in zip(scored["fp32"], scored["bf16"], strict=True))
    print(f"labels bf16 changed: {changed} of {len(tweets)}")

    predictions, seconds = timed(
        lambda: predict_sentiment(model, tokenizer, prompts, labels, params.batch_size, params.sentiment_max_new_tokens)
    )
    several = sum(p.labels_named > 1 for p in predictions)
    print(f"both ways, fp32, whole answers: {len(tweets) / seconds:6.1f} tweets/s; {several} name several labels")

    instructions = [r["prompt"] for r in load_instructions(args.prepared / "instructions_test.jsonl")]
    extra = [r["prompt"] for r in load_out_of_sample(args.prepared / "out_of_sample.jsonl")]

    def before():
        first = generate_answers(model, tokenizer, instructions, 20, params.max_new_tokens)
        second = generate_answers(model, tokenizer, extra, 20, params.max_new_tokens)
        return first.texts + second.texts, first.new_tokens + second.new_tokens

    def after():
        with inference_precision(params.precision, model.device) if params.precision else contextlib.nullcontext():
            done = generate_answers(
                model, tokenizer, instructions + extra, params.generation_batch_size, params.max_new_tokens
            )
        return done.texts, done.new_tokens

    (old_texts, old_tokens), old_seconds = timed(before)
    (new_texts, new_tokens), new_seconds = timed(after)
    print(
        f"generation before (fp32, batch 20, two runs): {old_seconds:6.1f} s, {old_tokens / old_seconds:6.1f} tokens/s"
    )
    print(
        f"generation after ({params.precision}, batch {params.generation_batch_size}, one run): {new_seconds:6.1f} s, "
        f"{new_tokens / new_seconds:6.1f} tokens/s ({old_seconds / new_seconds:.2f}x)"
    )
    print(f"answers that differ: {sum(a != b for a, b in zip(old_texts, new_texts, strict=True))} of {len(old_texts)}")


if __name__ == "__main__":
    main()

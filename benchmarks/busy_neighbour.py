"""The train stage and label scoring with busy neighbours: alone, with one and with two busy processes.

    python benchmarks/busy_neighbour.py [--steps 8] [--tweets 200] [--neighbours 0,1,2] [--json out.json]

A neighbour is what a user's laptop runs beside us: a single-threaded busy loop started from another terminal
(a session of its own, so Linux's autogroups give it a fair share of the CPU whatever its nice value:
``setsid nice -n 19 python3 -c 'while True: pass'``). Each measurement runs in a fresh process: the train
stage's ``train_adapter`` on the first ``steps x train.batch_size`` training records (no checkpoints, no
validation), and the eval stage's label scoring of ``--tweets`` held-out tweets with the sentiment adapter. It
prints each time, the ratio to the undisturbed time and the thread counts the stage went through; a run that
passes ``--limit`` times the undisturbed time is stopped and reported as more than that. Run from a repository
where `dvc repro` has run (it reads data/prepared and models/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEIGHBOUR = "while True: pass"


def start_neighbours(count: int) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, "-c", NEIGHBOUR], start_new_session=True, preexec_fn=lambda: os.nice(19))
        for _ in range(count)
    ]


def child_train(steps: int) -> dict:
    from lorapipe.config import load_params
    from lorapipe.host import shared_cores
    from lorapipe.io import write_jsonl
    from lorapipe.records import read_records
    from lorapipe.training.recipe import TrainJob, train_adapter

    params = load_params(Path("params.yaml"))
    rows = read_records(Path("data/prepared/sentiment_train.jsonl"))[: steps * params.train.batch_size]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        write_jsonl(out / "train.jsonl", rows)
        train = params.train.model_copy(update={"save_steps": 10**6, "eval_steps": 10**6, "epochs": 1})
        job = TrainJob("busy", Path("models/base"), out / "train.jsonl", out / "adapter", out / "ck", out / "s.json")
        with shared_cores():
            started = time.perf_counter()
            summary = train_adapter(job, params.lora, train)
            seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 1), "steps": summary["steps"], "precision": summary["precision"]}


def child_score(tweets: int) -> dict:
    from lorapipe.config import load_params
    from lorapipe.decoding import predict_sentiment
    from lorapipe.evaluation.evaluate import load_sentiment
    from lorapipe.host import shared_cores
    from lorapipe.labels import read_labels
    from lorapipe.models.loading import load_for_inference, load_tokenizer, tokenizer_dir

    params = load_params(Path("params.yaml")).eval
    base, adapter = Path("models/base"), Path("models/adapters/sentiment")
    model = load_for_inference(base, adapter)
    tokenizer = load_tokenizer(tokenizer_dir(base, adapter), padding_side="left")
    labels = read_labels(Path("data/prepared/labels.json")).labels
    prompts = [r["prompt"] for r in load_sentiment(Path("data/prepared/sentiment_test.jsonl"), labels, tweets)]
    with shared_cores():
        started = time.perf_counter()
        predict_sentiment(model, tokenizer, prompts, labels, params.batch_size, 1)
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 1), "tweets": len(prompts)}


def measure(part: str, size: int, neighbours: int, limit: float | None) -> dict:
    """One fresh child process's figures, with ``neighbours`` busy loops running in sessions of their own."""
    busy = start_neighbours(neighbours)
    try:
        time.sleep(0.5)  # the neighbours are running before the child starts
        command = [sys.executable, __file__, "--child", part, "--size", str(size)]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            return {"neighbours": neighbours, "seconds": None, "more_than": round(limit or 0, 1)}
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        threads = re.findall(r"threads: (\d+) -> (\d+)", done.stderr)
        first = re.search(r"threads: (\d+) of \d+ cores", done.stderr)
        return {
            "neighbours": neighbours,
            **figures,
            "process_seconds": round(time.perf_counter() - started, 1),
            "threads_at_start": int(first.group(1)) if first else None,
            "thread_changes": [f"{a}->{b}" for a, b in threads],
        }
    finally:
        for process in busy:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="training steps of train.batch_size records")
    parser.add_argument("--tweets", type=int, default=200, help="held-out tweets label-scored")
    parser.add_argument("--neighbours", default="0,1,2", help="busy neighbours per run, comma-separated")
    parser.add_argument("--limit", type=float, default=4.0, help="stop a run past this many undisturbed times")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", choices=("train", "score"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from lorapipe.io import setup_logging

        setup_logging()
        print(json.dumps(child_train(args.size) if args.child == "train" else child_score(args.size)))
        return
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    results: dict = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "lorapipe_threads": os.environ.get("LORAPIPE_THREADS"),
    }
    counts = [int(n) for n in args.neighbours.split(",")]
    for part, size in (("train", args.steps), ("score", args.tweets)):
        rows, alone = [], None
        for count in counts:
            row = measure(part, size, count, alone * args.limit if alone else None)
            alone = alone or row["seconds"]
            row["ratio"] = round(row["seconds"] / alone, 2) if row.get("seconds") else f"> {args.limit}"
            rows.append(row)
            print(
                f"{part}: {count} neighbour(s): {row.get('seconds') or '>' + str(row['more_than'])} s "
                f"({row['ratio']}x alone), threads {row.get('threads_at_start')} {row.get('thread_changes', '')}",
                flush=True,
            )
        results[part] = rows
    print(f"on {cpu}, {results['cores']} cores")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

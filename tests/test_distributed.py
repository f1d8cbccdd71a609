"""Training in two processes through accelerate (DDP over gloo on the CPU) matches one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, sentiment_rows, tiny_params
from lorapipe.config import parse_params
from lorapipe.io import write_jsonl

pytestmark = pytest.mark.slow


def train(tmp_path: Path, name: str, model: Path, processes: int) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path / name
    command = [
        sys.executable,
        str(ROOT / "stages" / "train.py"),
        *("--params", str(tmp_path / f"params-{processes}.yaml"), "--name", name, "--base", str(model)),
        *("--train-file", str(tmp_path / "train.jsonl"), "--adapter-out", str(out / "adapter")),
        *("--checkpoints", str(out / "checkpoints"), "--live-dir", str(out / "live")),
        *("--summary", str(out / "summary.json"), "--processes", str(processes)),
        *("--accelerate-config", str(ROOT / "configs" / "accelerate" / "ddp.yaml")),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done


def test_two_processes_with_the_same_global_batch_train_the_same_adapter(tmp_path, tiny_model):
    raw = tiny_params(tiny_model, tmp_path / "t.csv", tmp_path / "i.json")
    raw["lora"].update(dropout=0.0)
    raw["train"].update(learning_rate=1e-2, logging_steps=1, save_steps=2, cpu_precision="fp32")
    for processes in (1, 2):  # the same global batch of 4: 4 x 1 process, 2 x 2 processes
        per_process = {**raw["train"], "batch_size": 4 // processes, "processes": processes}
        (tmp_path / f"params-{processes}.yaml").write_text(yaml.safe_dump({**raw, "train": per_process}))
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(parse_params(raw).prompt, 32))

    single, _ = train(tmp_path, "one", tiny_model, 1)
    double, log = train(tmp_path, "two", tiny_model, 2)

    assert "launching 2 processes" in log.stderr and "accelerate.commands.launch" in log.stderr
    summary = json.loads((double / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 8
    assert json.loads((single / "summary.json").read_text())["steps"] == 8
    # Rank 0 alone decides where to start and writes the adapter; the other rank only trains.
    assert log.stderr.count("rank 0 decided: resume from the start") == 1
    assert log.stderr.count(f"rank 0 wrote {double / 'adapter'}") == 1 and "rank 1 wrote" not in log.stderr
    curve = (double / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    losses = [float(row.split("\t")[-1]) for row in curve]
    assert losses[-1] < losses[0]
    one = load_file(single / "adapter" / "adapter_model.safetensors")
    two = load_file(double / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    # LoRA B starts at zero, so B is what training learned: the two runs learned the same within float noise.
    learned = [key for key in one if "lora_B" in key]
    assert learned and all(one[key].abs().max() > 1e-3 for key in learned)
    for key in one:
        assert (one[key] - two[key]).norm() <= 1e-3 * one[key].norm(), key

    # Killed while saving the last checkpoint: both ranks resume from the one before, decided by rank 0 and
    # sent to rank 1, and finish with the adapter the uninterrupted run trained.
    finished = {key: value.clone() for key, value in two.items()}
    (double / "checkpoints" / "checkpoint-8" / "trainer_state.json").unlink()
    shutil.rmtree(double / "adapter")
    (double / "summary.json").unlink()
    resumed, log = train(tmp_path, "two", tiny_model, 2)
    assert log.stderr.count("rank 0 decided: resume from checkpoint-6") == 1
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == "checkpoint-6"
    again = load_file(resumed / "adapter" / "adapter_model.safetensors")
    for key in finished:
        assert (again[key] - finished[key]).norm() <= 1e-5 * finished[key].norm(), key

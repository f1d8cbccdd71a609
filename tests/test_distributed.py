"""Training in two processes through accelerate (DDP over gloo on the CPU) matches one process.

The ranks agree on how many forward/backward passes each batch takes (the most any rank needs), since every pass
runs collectives: two ranks whose batches split differently finish, with the one-process adapter.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, local_ray_cluster, sentiment_rows, tiny_params
from lorapipe.config import parse_params
from lorapipe.data.prompts import instruction_prompt
from lorapipe.errors import PipelineError
from lorapipe.io import write_jsonl
from lorapipe.models.loading import choose_hardware, load_causal_lm, load_tokenizer
from lorapipe.records import record
from lorapipe.training import trainer as trainer_module
from lorapipe.training.batching import pass_count, prefix_key
from lorapipe.training.build import lora_config, sft_config
from lorapipe.training.machines import compare_inputs, fingerprint, machine_inputs

RUN_TIMEOUT = 300  # seconds; a run whose ranks fall out of step waits for ever in a collective

# Killed in both ranks while checkpoint-8 is half written (its adapter weights, not its trainer state), as
# tests/test_training.py's KILL_WHILE_SAVING does in one process; loaded by every Python process of the run.
KILL_AT_CHECKPOINT_8 = """
import os, signal
from transformers import Trainer

save = Trainer._save_optimizer_and_scheduler
def killed_mid_save(self, output_dir):
    if str(output_dir).endswith("checkpoint-8"):
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, output_dir)
Trainer._save_optimizer_and_scheduler = killed_mid_save
"""


def train(
    tmp_path: Path,
    name: str,
    model: Path,
    processes: int,
    patch: Path | None = None,
    machines: int = 1,
    env: dict[str, str] | None = None,
) -> tuple[Path, subprocess.CompletedProcess]:
    """stages/train.py run to its end (or killed, with everything it started, after RUN_TIMEOUT seconds)."""
    out = tmp_path / name
    command = [
        sys.executable,
        str(ROOT / "stages" / "train.py"),
        *("--params", str(tmp_path / f"params-{processes}.yaml"), "--name", name, "--base", str(model)),
        *("--train-file", str(tmp_path / "train.jsonl"), "--adapter-out", str(out / "adapter")),
        *("--checkpoints", str(out / "checkpoints"), "--live-dir", str(out / "live")),
        *("--summary", str(out / "summary.json"), "--processes", str(processes), "--machines", str(machines)),
        *("--accelerate-config", str(ROOT / "configs" / "accelerate" / "ddp.yaml")),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if patch is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(patch), env.get("PYTHONPATH")]))
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as running:
        try:
            stdout, stderr = running.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            for pid in [running.pid, *descendants(running.pid)]:  # listed before any is killed and reparented
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stdout, stderr = running.communicate()
            pytest.fail(f"{name}: still running after {RUN_TIMEOUT} s (ranks out of step?)\n{stderr[-4000:]}")
    return out, subprocess.CompletedProcess(command, running.returncode, stdout, stderr)


def descendants(pid: int) -> list[int]:
    """Every process started under ``pid`` (Linux /proc): torch's launcher starts each rank in a session of its own,
    so killing the run's process group would leave the ranks waiting, holding its output pipes open."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def trained(
    tmp_path: Path, name: str, model: Path, processes: int, **kwargs
) -> tuple[Path, subprocess.CompletedProcess]:
    out, done = train(tmp_path, name, model, processes, **kwargs)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done


def write_params(tmp_path: Path, raw: dict) -> None:
    """params-1.yaml and params-2.yaml: the same global batch of 4, as 4 x 1 process and 2 x 2 processes."""
    for processes in (1, 2):
        per_process = {**raw["train"], "batch_size": 4 // processes, "processes": processes}
        (tmp_path / f"params-{processes}.yaml").write_text(yaml.safe_dump({**raw, "train": per_process}))


def assert_same_adapter(single: Path, double: Path) -> dict[str, torch.Tensor]:
    one = load_file(single / "adapter" / "adapter_model.safetensors")
    two = load_file(double / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    # LoRA B starts at zero, so B is what training learned: the two runs learned the same within float noise.
    learned = [key for key in one if "lora_B" in key]
    assert learned and all(one[key].abs().max() > 1e-3 for key in learned)
    for key in one:
        assert (one[key] - two[key]).norm() <= 1e-3 * one[key].norm(), key
    return two


@pytest.mark.slow
def test_two_processes_with_the_same_global_batch_train_the_same_adapter(tmp_path, tiny_model):
    raw = tiny_params(tiny_model, tmp_path / "t.csv", tmp_path / "i.json")
    raw["lora"].update(dropout=0.0)
    raw["train"].update(learning_rate=1e-2, logging_steps=1, save_steps=2, cpu_precision="fp32")
    write_params(tmp_path, raw)
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(parse_params(raw).prompt, 32))

    single, _ = trained(tmp_path, "one", tiny_model, 1)
    double, log = trained(tmp_path, "two", tiny_model, 2)

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
    finished = assert_same_adapter(single, double)

    # Killed while saving the last checkpoint (a run of its own, so nothing depends on what a finished run keeps):
    # both ranks resume from the one before, decided by rank 0 and sent to rank 1, and finish with the adapter
    # the uninterrupted run trained.
    patch = tmp_path / "kill-at-checkpoint-8"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(KILL_AT_CHECKPOINT_8)
    cut, killed = train(tmp_path, "cut", tiny_model, 2, patch=patch)
    assert killed.returncode != 0, killed.stderr[-4000:]
    partial = cut / "checkpoints" / "checkpoint-8"
    assert (partial / "adapter_model.safetensors").exists() and not (partial / "trainer_state.json").exists()
    assert not (cut / "adapter").exists() and not (cut / "summary.json").exists()
    resumed, log = trained(tmp_path, "cut", tiny_model, 2)
    assert log.stderr.count("rank 0 decided: resume from checkpoint-6") == 1
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == "checkpoint-6"
    again = load_file(resumed / "adapter" / "adapter_model.safetensors")
    for key in finished:
        assert (again[key] - finished[key]).norm() <= 1e-5 * finished[key].norm(), key


INSTRUCTIONS = ("Name three colours.", "Write a short poem about the sea.", "Summarise the text.", "Say hello.")


def uneven_rows(prompt) -> list[dict]:
    """Four instructions (a group each) of six long answers and two short: each group's second batch of 4 holds
    the two last long answers, then the two short ones; ranks take a global batch's rows in order."""
    rows = []
    for instruction in INSTRUCTIONS:
        conversation = instruction_prompt(instruction, "", prompt)
        rows += [record(conversation, f"Red, green and blue {i}. " * 8) for i in range(6)]
        rows += [record(conversation, f"Red {i}.") for i in range(2)]
    return rows


@pytest.mark.slow
def test_ranks_whose_batches_split_into_different_pass_counts_keep_step(tmp_path, tiny_model):
    raw = tiny_params(tiny_model, tmp_path / "t.csv", tmp_path / "i.json")
    raw["lora"].update(dropout=0.0)
    # About 70 shared prompt tokens, then about 60 for a long answer and 6 for a short one: two long rows need
    # two passes of 140 tokens, two short rows one.
    raw["train"].update(
        learning_rate=1e-2, logging_steps=1, save_steps=100, cpu_precision="fp32", pass_tokens=140, fp32_pass_tokens=140
    )
    write_params(tmp_path, raw)
    write_jsonl(tmp_path / "train.jsonl", uneven_rows(parse_params(raw).prompt))

    single, _ = trained(tmp_path, "one", tiny_model, 1)
    double, log = trained(tmp_path, "two", tiny_model, 2)

    # Rank 1's short rows would have taken one pass where rank 0's long rows took two.
    assert log.stderr.count("rank 1: a batch its own split would run in 1 pass(es) runs in 2") == 1, log.stderr[-4000:]
    summary = json.loads((double / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["split_batches"] == 8
    assert_same_adapter(single, double)


def passes_run(trainer, batch: dict, agreed: int | None) -> tuple[float, dict[str, torch.Tensor], list]:
    """One training step of ``batch`` as a rank whose ranks agreed on ``agreed`` passes (None: its own count, as
    one process runs): the step's loss, the LoRA gradients and, per pass, its rows and whether it was idle."""
    seen = []
    compute = trainer_module.LabelHeadSFTTrainer.compute_loss

    def counted(self, model, inputs, **kwargs):
        seen.append((inputs["input_ids"].shape[0], bool(inputs.get(trainer_module.IDLE_PASS))))
        return compute(self, model, inputs, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        if agreed is not None:
            patch.setattr(trainer_module, "agreed_pass_count", lambda own, device: agreed)
        patch.setattr(trainer_module.LabelHeadSFTTrainer, "compute_loss", counted)
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.training_step(trainer.model, batch, (batch["labels"][:, 1:] != -100).sum()).item()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return loss, grads, seen


@pytest.mark.parametrize(("own", "agreed", "idle"), [(4, 6, 2), (2, 3, 1)])
def test_a_rank_with_fewer_rows_than_the_agreed_passes_joins_each_with_no_gradient(tiny_model, own, agreed, idle):
    from datasets import Dataset

    raw = tiny_params(tiny_model, Path("t.csv"), Path("i.json"))
    raw["lora"].update(dropout=0.0)
    raw["train"].update(cpu_precision="fp32")
    params = parse_params(raw)
    rows = uneven_rows(params.prompt)[:4]  # four long answers to one instruction: 4 passes of 140 tokens
    torch.manual_seed(0)
    trainer = trainer_module.LabelHeadSFTTrainer(
        model=load_causal_lm(tiny_model, attention="eager"),
        args=sft_config(params.train, choose_hardware(params.train, cuda=False), Path("/tmp/unused")),
        train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]),
        processing_class=load_tokenizer(tiny_model),
        peft_config=lora_config(params.lora),
        shared_prefix=True,
        group_keys=[prefix_key(r["prompt"]) for r in rows],
        pass_tokens=140,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert pass_count(batch, 140, True) == 4

    # One process: its own passes, as before.
    alone = passes_run(trainer, batch, None)
    assert alone[2] == [(1, False)] * 4
    # The rows in ``own`` passes, then ``idle`` more of one row each whose loss counts zero: the same loss and
    # the very same gradients, since each idle pass adds zeros.
    tokens = trainer._total_train_tokens
    split = passes_run(trainer, batch, own)
    joined = passes_run(trainer, batch, agreed)
    assert [idle for _, idle in joined[2]] == [False] * own + [True] * idle
    assert [rows for rows, _ in joined[2]] == [4 // own] * own + [1] * idle
    assert joined[0] == split[0]
    assert all(torch.equal(joined[1][name], split[1][name]) for name in split[1])
    assert any(grad.abs().max() > 0 for grad in split[1].values())
    # Idle passes count no tokens: both steps counted the batch's tokens once.
    assert trainer._total_train_tokens - tokens == 2 * int(batch["attention_mask"].sum())
    # And the whole batch's gradients, however many passes: as one process's own split.
    for name, grad in alone[1].items():
        assert torch.allclose(joined[1][name], grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.slow
def test_two_machines_started_through_ray_train_the_one_process_adapter(tmp_path, tiny_model):
    """train.machines 2: the stage starts machine 1's launcher on another node of a Ray cluster (two raylets on
    this machine, DDP over gloo between the two process groups); nobody types a command for machine 1."""
    raw = tiny_params(tiny_model, tmp_path / "t.csv", tmp_path / "i.json")
    raw["lora"].update(dropout=0.0)
    raw["train"].update(learning_rate=1e-2, logging_steps=1, save_steps=100, cpu_precision="fp32")
    write_params(tmp_path, raw)
    two_machines = yaml.safe_load((tmp_path / "params-2.yaml").read_text())
    two_machines["train"]["machines"] = 2
    (tmp_path / "params-2.yaml").write_text(yaml.safe_dump(two_machines))
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(parse_params(raw).prompt, 32))

    single, _ = trained(tmp_path, "one", tiny_model, 1)
    with local_ray_cluster(head_cpus=1, worker_cpus=[1]) as address:
        double, log = trained(tmp_path, "two", tiny_model, 2, machines=2, env={"RAY_ADDRESS": address})

    assert "machine 0 of 2 at 127.0.0.2" in log.stderr and "--machine_rank 0" in log.stderr, log.stderr[-4000:]
    summary = json.loads((double / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 8
    assert log.stderr.count(f"rank 0 wrote {double / 'adapter'}") == 1
    assert_same_adapter(single, double)


def test_a_machine_whose_base_model_differs_or_lacks_a_file_is_named(tmp_path, monkeypatch):
    """What machine 1 reports of its inputs (another clone: another folder here) against machine 0's."""
    for machine in ("zero", "one"):
        (tmp_path / machine / "model").mkdir(parents=True)
        (tmp_path / machine / "model" / "config.json").write_text("{}")
        (tmp_path / machine / "model" / "model.safetensors").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path / "zero")
    expected = fingerprint(["model"])
    compare_inputs(1, expected, machine_inputs(str(tmp_path / "one"), ["model"]))  # the same: no error
    (tmp_path / "one" / "model" / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(PipelineError, match=r"^machine 1: model/model.safetensors is not the same as on machine 0"):
        compare_inputs(1, expected, machine_inputs(str(tmp_path / "one"), ["model"]))
    (tmp_path / "one" / "model" / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match=r"^machine 1: model/model.safetensors is missing"):
        compare_inputs(1, expected, machine_inputs(str(tmp_path / "one"), ["model"]))
    with pytest.raises(PipelineError, match=r"^machine 2: .*/nowhere: no such folder"):
        compare_inputs(2, expected, machine_inputs(str(tmp_path / "nowhere"), ["model"]))

"""LoRA/QLoRA supervised fine-tuning with TRL's SFTTrainer, resumable and logged with DVCLive."""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorapipe.config import LoraParams, TrainParams
from lorapipe.errors import PipelineError
from lorapipe.io import atomic_dir, read_jsonl, sha256_file, write_json
from lorapipe.modeling import Hardware, choose_hardware, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"


@dataclass(frozen=True)
class TrainJob:
    """Where one training run reads and writes."""

    name: str
    base_model: Path
    train_file: Path
    adapter_out: Path
    checkpoints: Path
    live_dir: Path
    summary_out: Path


def load_conversations(path: Path):
    """The prompt/completion columns of a chat JSONL file as a datasets.Dataset."""
    from datasets import Dataset

    rows = read_jsonl(path, required=("prompt", "completion"))
    if not rows:
        raise PipelineError(f"{path}: no training records")
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def lora_config(lora: LoraParams):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(train: TrainParams, hardware: Hardware, output_dir: Path):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        seed=train.seed,
        data_seed=train.seed,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        optim=hardware.optim,
        use_cpu=hardware.device == "cpu",
        bf16=hardware.precision == "bf16",
        fp16=hardware.precision == "fp16",
        activation_checkpointing=train.gradient_checkpointing,
        max_length=train.max_length,
        # Batches of similar lengths: on a CPU every padding token costs as much as a real one.
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        completion_only_loss=True,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def fingerprint(job: TrainJob, lora: LoraParams, train: TrainParams) -> dict[str, Any]:
    """What a checkpoint was trained from; a checkpoint of another fingerprint is never resumed."""
    base_manifest = job.base_model / "manifest.json"
    inputs = {
        "lora": lora.model_dump(),
        "train": train.model_dump(),
        "data": sha256_file(job.train_file),
        "base": sha256_file(base_manifest) if base_manifest.exists() else None,
    }
    inputs["digest"] = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return inputs


def last_checkpoint(checkpoints: Path, expected: dict[str, Any]) -> str | None:
    """The newest checkpoint to resume from, or None; clears checkpoints of other inputs."""
    from transformers.trainer_utils import get_last_checkpoint

    if not checkpoints.is_dir():
        return None
    stamp = checkpoints / FINGERPRINT
    previous = json.loads(stamp.read_text()) if stamp.exists() else None
    if previous is None or previous.get("digest") != expected["digest"]:
        if any(checkpoints.iterdir()):
            log.info("checkpoints in %s come from other params or data: starting over", checkpoints)
        shutil.rmtree(checkpoints)
        return None
    return get_last_checkpoint(str(checkpoints))


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def train_adapter(job: TrainJob, lora: LoraParams, train: TrainParams, hardware: Hardware | None = None) -> dict:
    """Fine-tune a LoRA adapter on ``job.train_file``; write the adapter, the curves and a summary."""
    from dvclive import Live
    from transformers import set_seed
    from transformers.integrations import DVCLiveCallback
    from trl import SFTTrainer

    hardware = hardware or choose_hardware(train)
    for fallback in hardware.fallbacks:
        log.warning("fallback: %s", fallback)
    # Seeded, but not torch's deterministic mode: on CPUs it makes bf16 training ~8x slower, and the CPU kernels
    # used here are deterministic anyway (tests/test_training.py checks two runs give equal weights).
    set_seed(train.seed)
    dataset = load_conversations(job.train_file)
    tokenizer = load_tokenizer(job.base_model)
    model = load_causal_lm(job.base_model, hardware)
    if hardware.quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)

    expected = fingerprint(job, lora, train)
    resume = last_checkpoint(job.checkpoints, expected)
    job.checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(job.checkpoints / FINGERPRINT, expected)
    if resume:
        log.info("resuming from %s", resume)

    # transformers' own DVCLive callback, given a Live of our own: one folder per model, and no dvc.yaml rewrite.
    live = Live(dir=str(job.live_dir), resume=bool(resume), dvcyaml=False, save_dvc_exp=False)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(train, hardware, job.checkpoints),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(lora),
        callbacks=[DVCLiveCallback(live=live)],
    )
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info(
        "%s: %d examples, %d trainable of %d parameters (%.2f%%) on %s in %s",
        job.name,
        len(dataset),
        trainable,
        total,
        100 * trainable / total,
        hardware.device,
        hardware.precision,
    )

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - started

    state = trainer.state
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    tokens = int(state.num_input_tokens_seen)
    summary = {
        "model": job.name,
        "examples": len(dataset),
        "steps": state.global_step,
        "epochs": state.epoch,
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / wall, 1) if wall else None,
        "wall_seconds": round(wall, 1),
        "peak_memory_mib": round(peak_memory_mib(hardware.device), 1),
        "final_loss": losses[-1] if losses else None,
        "mean_loss": result.training_loss,
        "resumed_from": Path(resume).name if resume else None,
        "device": hardware.device,
        "precision": hardware.precision,
        "quantized_4bit": hardware.quantize_4bit,
        "optim": hardware.optim,
        "fallbacks": list(hardware.fallbacks),
        "trainable_parameters": trainable,
    }
    if trainer.is_world_process_zero():
        with atomic_dir(job.adapter_out) as staging:
            trainer.model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        write_json(job.summary_out, summary)
    log.info(
        "%s: %d steps, %d tokens in %.0f s (%.0f tok/s), final loss %s",
        job.name,
        summary["steps"],
        tokens,
        wall,
        summary["tokens_per_second"] or 0,
        summary["final_loss"],
    )
    return summary

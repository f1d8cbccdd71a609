"""LoRA/QLoRA supervised fine-tuning: load, resume, train, summarise, save.

:func:`train_adapter` reads as the recipe it runs (in the manner of alignment-handbook's ``sft.py``); its steps live
in modules of their own: the model and trainer (:mod:`~lorapipe.training.build`), records fitted to ``max_length``
(:mod:`~lorapipe.training.fitting`), the precision probe (:mod:`~lorapipe.training.probe`), resumable checkpoints
(:mod:`~lorapipe.training.checkpoints`) and what a finished run writes (:mod:`~lorapipe.training.outputs`). The
trainer is TRL's SFTTrainer with this project's loss and batching (:mod:`lorapipe.training.trainer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lorapipe.config import LoraParams, TrainParams
from lorapipe.errors import PipelineError
from lorapipe.host import PrecisionChoice, bound_onednn_cache, keep_freed_memory, shared_cores, watch_cores
from lorapipe.io import write_json
from lorapipe.labels import read_labels
from lorapipe.models.loading import Hardware, choose_hardware
from lorapipe.records import read_records
from lorapipe.training.build import build_trainer, load_model
from lorapipe.training.checkpoints import FINGERPRINT, fingerprint, resume_point
from lorapipe.training.fitting import fit_to_max_length
from lorapipe.training.job import TrainJob
from lorapipe.training.launch import launched, rank
from lorapipe.training.outputs import save_adapter, summarise
from lorapipe.training.probe import measure_precision, use_label_head
from lorapipe.training.validation import Validation

log = logging.getLogger(__name__)


def train_adapter(job: TrainJob, lora: LoraParams, train: TrainParams, hardware: Hardware | None = None) -> dict:
    """Fine-tune a LoRA adapter on ``job.train_file``; write the adapter, its card, the curves and a summary."""
    from accelerate import PartialState
    from transformers import set_seed

    bound_onednn_cache()  # before the first matmul
    keep_freed_memory()  # before the first step's activations
    hardware = hardware or choose_hardware(train)
    for fallback in hardware.fallbacks:
        log.warning("fallback: %s", fallback)
    # Seeded, not torch's deterministic mode: on CPUs it makes bf16 training several times slower, and the kernels
    # here are deterministic anyway (tests/test_training.py checks two runs give equal weights).
    set_seed(train.seed)
    rows = read_records(job.train_file)
    valid = read_validation(job)
    if launched():  # join the other processes now: the ranks agree on precision and resume point
        PartialState()
    with shared_cores():
        tokenizer, model = load_model(job.base_model, lora, train, hardware, job.params_file)
        rows, overlong = fit_to_max_length(tokenizer, rows, train, job.train_file)
        choice = PrecisionChoice(hardware.precision)
        label_head = use_label_head(model, tokenizer, rows, train)
        if hardware.precision == "auto":
            choice = measure_precision(model, tokenizer, rows, lora, train, label_head)
            hardware = dataclasses.replace(hardware, precision=choice.precision)
        resume = resume_checkpoint(job, lora, train, hardware)
        trainer = build_trainer(job, rows, model, tokenizer, lora, train, hardware, resume is not None, label_head)
        trainer.add_callback(WatchCores())
        validation = None
        if valid is not None:
            validation = Validation(tokenizer, valid[1], valid[0], train.eval_steps)
            validation.trainer = trainer
            trainer.add_callback(validation)
        started = time.perf_counter()
        with disk_full_is_one_line(job.checkpoints):
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        wall = time.perf_counter() - started
    summary = summarise(job, trainer, result, hardware, len(rows), wall, resume, choice)
    summary.update(overlong_records=overlong, overlong=train.overlong)
    summary["validation"] = validation.summary() if validation is not None else None
    save_adapter(job, trainer, lora, train, summary, len(rows))
    return summary


def read_validation(job: TrainJob) -> tuple[tuple[str, ...], list[dict[str, Any]]] | None:
    """The label set and the validation records, or None where there are none to score."""
    if job.valid_file is None:
        return None
    if job.labels_file is None:
        raise PipelineError(f"{job.valid_file}: validation records need the label set (--labels)")
    labels = read_labels(job.labels_file).labels
    rows = read_records(job.valid_file, text_fields=("text", "label"), labels=labels, allow_empty=True)
    if not rows:
        log.info("no validation records in %s (data.split.valid_size 0): no validation while training", job.valid_file)
        return None
    return labels, rows


@contextlib.contextmanager
def disk_full_is_one_line(checkpoints: Path) -> Iterator[None]:
    """A full disk while a checkpoint is written (an OSError, or safetensors' own error) becomes one clear line."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        if getattr(err, "errno", None) != errno.ENOSPC and "No space left on device" not in str(err):
            raise
        raise PipelineError(
            f"{checkpoints}: no space left on device while saving a checkpoint; free space and run the stage again "
            "(it resumes from the last complete checkpoint)"
        ) from None


class WatchCores(TrainerCallback):
    """Before each step, log other work taking or giving back cores (the thread count stays as the stage chose)."""

    def on_step_begin(self, args, state, control, **kwargs):
        watch_cores()


def host_choices(hardware: Hardware) -> dict[str, Any]:
    """The choices made for this machine that change a training step's arithmetic."""
    return {
        "device": hardware.device,
        "precision": hardware.precision,
        "quantize_4bit": hardware.quantize_4bit,
        "optim": hardware.optim,
        "attention": hardware.attention,
    }


def resume_checkpoint(job: TrainJob, lora: LoraParams, train: TrainParams, hardware: Hardware) -> Path | None:
    """The complete checkpoint of the same inputs to resume from, or None; stamps the folder with the inputs.

    Rank 0 alone looks (it deletes stale checkpoints and rewrites the stamp while it does) and sends its answer
    to the other ranks, so they all resume from the same step.
    """
    decided: list[str | None] = [None]
    if rank() == 0:
        expected = fingerprint(
            {"lora": lora.model_dump(), "train": train.model_dump()},
            job.train_file,
            job.base_model,
            job.script or Path(__file__),
            host_choices(hardware),
        )
        resume = resume_point(job.checkpoints, expected)
        job.checkpoints.mkdir(parents=True, exist_ok=True)
        write_json(job.checkpoints / FINGERPRINT, expected)
        decided = [resume.name if resume else None]
        log.info("rank 0 decided: resume from %s", decided[0] or "the start")
    if launched() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(decided, src=0)
    return job.checkpoints / decided[0] if decided[0] else None

"""What a finished run writes: its summary, the adapter with its card, and the removal of its checkpoints."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from lorapipe.host import PrecisionChoice, peak_rss_mib
from lorapipe.io import atomic_file, read_json, remove_stale_staging, replace_dir, sha256_file, write_json
from lorapipe.models.loading import Hardware
from lorapipe.models.model_card import CARD_FACTS, CardFacts, render_model_card
from lorapipe.training.checkpoints import remove_checkpoints
from lorapipe.training.job import TrainJob
from lorapipe.training.launch import rank

log = logging.getLogger(__name__)


def summarise(
    job, trainer, result, hardware: Hardware, examples: int, wall: float, resume: Path | None, choice: PrecisionChoice
) -> dict:
    state = trainer.state
    cuda = hardware.device == "cuda"
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    tokens = int(state.num_input_tokens_seen)
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    summary = {
        "model": job.name,
        "examples": examples,
        "steps": state.global_step,
        "epochs": state.epoch,
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / wall, 1) if wall else None,
        "examples_per_second": round(examples * (state.epoch or 0) / wall, 2) if wall else None,
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": result.training_loss,
        "resumed_from": resume.name if resume else None,
        "steps_trained": state.global_step - resumed_step(resume),
        "device": hardware.device,
        "precision": hardware.precision,
        "precision_measured": choice.measured,
        "precision_rates": choice.rates,
        "precision_probe": choice.probe if choice.measured else None,
        "pass_tokens": getattr(trainer, "pass_tokens", None),
        "split_batches": getattr(trainer, "split_batches", 0),
        "quantized_4bit": hardware.quantize_4bit,
        "optim": hardware.optim,
        "attention": hardware.attention,
        "shared_prefix": getattr(trainer, "shared_prefix", False),
        "processes": trainer.accelerator.num_processes,
        "threads": torch.get_num_threads(),  # chosen once when the stage started (lorapipe/host/threads.py)
        "fallbacks": list(hardware.fallbacks),
        "trainable_parameters": trainable,
    }
    log.info(
        "%s: %d steps, %d tokens in %.0f s (%.0f tok/s, %.2f examples/s), final loss %s",
        job.name,
        summary["steps"],
        tokens,
        wall,
        summary["tokens_per_second"] or 0,
        summary["examples_per_second"] or 0,
        summary["final_loss"],
    )
    return summary


def resumed_step(resume: Path | None) -> int:
    """The optimizer step a run resumed at (0: it started from the beginning)."""
    return int(resume.name.rsplit("-", 1)[1]) if resume else 0


def save_adapter(job: TrainJob, trainer, lora, train, summary: dict, examples: int) -> None:
    """The adapter with its tokenizer and model card, then the summary; each replaces the old one only when whole.

    Every process calls this: under FSDP, saving gathers the shards; only the main process writes files.
    """
    staging = job.adapter_out.with_name(f".{job.adapter_out.name}.saving")
    main = trainer.is_world_process_zero()
    if main:
        remove_stale_staging(job.adapter_out)
    trainer.accelerator.wait_for_everyone()
    if getattr(trainer.accelerator.state, "fsdp_plugin", None) is not None:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(staging))  # the adapter, its config and the tokenizer
    if not main:
        return
    # Trainer also pickles its arguments beside the adapter; a user who loads that file runs what it holds, and the
    # arguments are in the card and the curves already, so the adapter we register and push ships no pickle.
    (staging / "training_args.bin").unlink(missing_ok=True)
    manifest = job.base_model / "manifest.json"
    facts = CardFacts(
        name=job.name,
        base_model=read_json(manifest) if manifest.exists() else {"name": str(job.base_model)},
        train_file=str(job.train_file),
        train_sha256=sha256_file(job.train_file),
        examples=examples,
        lora=lora.model_dump(),
        train=train.model_dump(),
        summary=summary,
    )
    (staging / "README.md").write_text(render_model_card(facts), encoding="utf-8")
    write_json(staging / CARD_FACTS, dataclasses.asdict(facts))  # the report renders the card again with evaluation
    replace_dir(staging, job.adapter_out)
    log.info("rank %d wrote %s", rank(), job.adapter_out)
    with atomic_file(job.summary_out) as tmp:
        write_json(tmp, summary)
    # The checkpoints only resume an interrupted run: a finished one's would let a rerun under new code or
    # libraries "resume" at the last step, train nothing and keep the old adapter.
    removed = remove_checkpoints(job.checkpoints)
    log.info("removed %d checkpoint(s) of the finished run from %s", removed, job.checkpoints)

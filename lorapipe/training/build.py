"""The model, the LoRA and SFT configs, and the trainer: TRL's SFTTrainer, or this project's label-head subclass."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lorapipe.config import LoraParams, TrainParams
from lorapipe.errors import PipelineError
from lorapipe.models.loading import (
    Hardware,
    load_causal_lm,
    load_tokenizer,
    sharded_launch,
    store_frozen_linears_in_bf16,
)
from lorapipe.training.batching import prefix_key
from lorapipe.training.job import TrainJob
from lorapipe.training.launch import rank

log = logging.getLogger(__name__)


def load_model(base: Path, lora: LoraParams, train: TrainParams, hardware: Hardware, params_file: Path):
    """The tokenizer and the base model (4-bit on CUDA), its target modules checked against ``lora``."""
    tokenizer = load_tokenizer(base)
    model = load_causal_lm(base, hardware, attention=hardware.attention)
    check_target_modules(model, lora, params_file)
    if hardware.quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
    return tokenizer, model


def check_target_modules(model, lora: LoraParams, params_file: Path = Path("params.yaml")) -> None:
    """Every name in ``lora.target_modules`` must name a module of the model (PEFT errors only if none does)."""
    if lora.target_modules == "all-linear":
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in lora.target_modules if target not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise PipelineError(
            f"{params_file}: lora.target_modules: {missing[0]!r} names no module of {type(model).__name__}; "
            f"its linear modules are {linear}"
        )


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
        # transformers 5 folded warmup_ratio into warmup_steps: a value below 1 is a share of the steps.
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        optim=hardware.optim,
        use_cpu=hardware.device == "cpu",
        bf16=hardware.precision == "bf16",
        fp16=hardware.precision == "fp16",
        # transformers 5's name for gradient checkpointing.
        activation_checkpointing=train.gradient_checkpointing,
        max_length=train.max_length,
        # Batches of similar lengths: on a CPU every padding token costs as much as a real one.
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        completion_only_loss=True,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every forward
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def pass_tokens(train: TrainParams, precision: str) -> int | None:
    """The most tokens a forward/backward pass runs in ``precision``: fp32's own budget where one is set.

    fp32 activations take more memory than bf16 autocast's, which took the mixed set over 3 GiB with bf16's
    budget (docs/your-machine.md).
    """
    if precision == "fp32" and train.fp32_pass_tokens is not None:
        return train.fp32_pass_tokens
    return train.pass_tokens


def use_shared_prefix(train: TrainParams, label_head: bool, quiet: bool = False) -> bool:
    """Shared prefixes need the KV cache and the label-head forward, which some settings rule out."""
    if not train.shared_prefix:
        return False
    for reason, applies in (
        ("gradient checkpointing drops the KV cache", train.gradient_checkpointing),
        ("FSDP / DeepSpeed shard the layers that would run twice", sharded_launch()),
        ("the label head is off", not label_head),
    ):
        if applies:
            if not quiet:
                log.warning("fallback: shared_prefix off: %s", reason)
            return False
    return True


def build_trainer(job: TrainJob, rows, model, tokenizer, lora, train, hardware, resuming: bool, label_head: bool):
    """SFTTrainer with the label-head loss, prefix-grouped batches and DVCLive curves on the main process."""
    from datasets import Dataset
    from trl import SFTTrainer

    from lorapipe.training.trainer import LabelHeadSFTTrainer

    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    shared = use_shared_prefix(train, label_head)
    kwargs: dict[str, Any] = {
        "model": model,
        "args": sft_config(train, hardware, job.checkpoints),
        "train_dataset": dataset,
        "processing_class": tokenizer,
        "peft_config": lora_config(lora),
        "callbacks": live_callbacks(job.live_dir, resuming),
    }
    if label_head:
        keys = [prefix_key(r["prompt"]) for r in rows] if shared else None
        trainer = LabelHeadSFTTrainer(
            **kwargs, shared_prefix=shared, group_keys=keys, pass_tokens=pass_tokens(train, hardware.precision)
        )
    else:
        trainer = SFTTrainer(**kwargs)
    if hardware.quantize_4bit and hardware.precision == "fp16":
        # TRL casts QLoRA adapters to bf16 (the QLoRA paper's choice); fp16 mixed precision needs them in fp32,
        # where its gradient scaler works (PEFT's default for adapters).
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if hardware.device == "cpu" and hardware.precision == "bf16":
        log.info("bf16 autocast: %d frozen linear layers stored in bf16", store_frozen_linears_in_bf16(trainer.model))
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info(
        "%s: %d examples, %d trainable of %d parameters (%.2f%%) on %s in %s, %d process(es), shared prefix %s",
        job.name,
        len(dataset),
        trainable,
        total,
        100 * trainable / total,
        hardware.device,
        hardware.precision,
        trainer.accelerator.num_processes,
        "on" if shared else "off",
    )
    return trainer


def live_callbacks(live_dir: Path | None, resuming: bool) -> list:
    """transformers' own DVCLive callback with a Live of ours (one folder per model, no dvc.yaml rewrite)."""
    if live_dir is None or rank() != 0:
        return []
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class StepDVCLiveCallback(DVCLiveCallback):
        """DVCLive's step is the optimizer step: the loss and the validation figures share one x axis."""

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            self.live.step = state.global_step
            super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    return [StepDVCLiveCallback(live=Live(dir=str(live_dir), resume=resuming, dvcyaml=False, save_dvc_exp=False))]

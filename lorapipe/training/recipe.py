"""LoRA/QLoRA supervised fine-tuning: load, resume, train, summarise, save.

:func:`train_adapter` reads as the recipe it runs (in the manner of alignment-handbook's ``sft.py``);
each step is a function below it. The trainer is TRL's SFTTrainer with this project's loss and batching
(:mod:`lorapipe.training.trainer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lorapipe.config import LoraParams, TrainParams
from lorapipe.errors import PipelineError
from lorapipe.host import (
    PrecisionChoice,
    all_ranks_agree,
    bound_onednn_cache,
    choose_precision,
    keep_freed_memory,
    peak_rss_mib,
    refresh_threads,
    shared_cores,
    step_timer,
)
from lorapipe.io import atomic_file, read_json, remove_stale_staging, replace_dir, sha256_file, write_json
from lorapipe.labels import read_labels
from lorapipe.models.loading import (
    Hardware,
    choose_hardware,
    frozen_linears_in_bf16,
    load_causal_lm,
    load_tokenizer,
    sharded_launch,
    store_frozen_linears_in_bf16,
)
from lorapipe.models.model_card import CARD_FACTS, CardFacts, render_model_card
from lorapipe.records import read_records
from lorapipe.training.batching import prefix_key, split_rows
from lorapipe.training.checkpoints import FINGERPRINT, fingerprint, resume_point
from lorapipe.training.label_head import (
    add_label_head,
    label_head_agrees,
    remove_label_head,
    shared_prefix_length,
    supports_label_head,
    use_mask_dropout,
)
from lorapipe.training.launch import launched, rank
from lorapipe.training.validation import Validation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """Where one training run reads and writes; ``live_dir`` None: no DVCLive curves."""

    name: str
    base_model: Path
    train_file: Path
    adapter_out: Path
    checkpoints: Path
    summary_out: Path
    live_dir: Path | None = None
    params_file: Path = Path("params.yaml")  # named in errors about a param
    valid_file: Path | None = None  # validation records scored while training (none, or an empty file: no validation)
    labels_file: Path | None = None  # the label set of the validation records


def train_adapter(job: TrainJob, lora: LoraParams, train: TrainParams, hardware: Hardware | None = None) -> dict:
    """Fine-tune a LoRA adapter on ``job.train_file``; write the adapter, its card, the curves and a summary."""
    from accelerate import PartialState
    from transformers import set_seed

    bound_onednn_cache()  # before the first matmul
    keep_freed_memory()  # before the first step's activations
    hardware = hardware or choose_hardware(train)
    for fallback in hardware.fallbacks:
        log.warning("fallback: %s", fallback)
    # Seeded, not torch's deterministic mode: on CPUs it makes bf16 training ~8x slower, and the CPU kernels used
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
        resume = resume_checkpoint(job, lora, train)
        trainer = build_trainer(job, rows, model, tokenizer, lora, train, hardware, resume is not None, label_head)
        trainer.add_callback(RefreshThreads())
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


class RefreshThreads(TrainerCallback):
    """Before each step, threads = cores / the lorapipe workers running now (a queued experiment may start)."""

    def on_step_begin(self, args, state, control, **kwargs):
        refresh_threads()


# The timed batch has the stage's rows (up to 16: fewer rows are dominated by per-layer overheads, which hid
# most of bf16's 1.9x here), run in the stage's passes; the untimed warm-up runs 2 of them.
PROBE_ROWS, WARM_UP_ROWS = 16, 2
# The probe runs the first 6 decoder layers: on the AMD EPYC (Zen 4) they timed bf16 / fp32 at 1.54-1.84x where
# the whole 30-layer stack timed 1.57-1.68x, in 4.3-4.5 s instead of 18.5-19.2 s (three alternating rounds);
# with 3 layers the embeddings and the head weigh more and the ratio fell to 1.17-1.60x.
PROBE_LAYERS = 6


def tokenize_records(
    tokenizer, rows: list[dict[str, Any]], max_length: int | None = None
) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer, cut to ``max_length``; prompt length) per record, as the chat template renders
    them."""
    encoded = []
    for record in rows:
        prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        encoded.append((ids, len(tokenizer(prompt, add_special_tokens=False)["input_ids"])))
    return encoded


def fit_to_max_length(
    tokenizer, rows: list[dict[str, Any]], train: TrainParams, source: Path
) -> tuple[list[dict[str, Any]], int]:
    """``rows`` without those longer than ``train.max_length`` tokens (``train.overlong: drop``), and their count.

    Truncating keeps the start, so a long record loses its answer's end and the end-of-turn token, and the model
    learns to run on; ``refuse`` stops at the first such record, ``truncate`` keeps them cut (TRL's way).
    """
    encoded = tokenize_records(tokenizer, rows)
    lengths = [len(ids) for ids, _ in encoded]
    over = {i for i, length in enumerate(lengths) if length > train.max_length}
    if over and train.overlong == "refuse":
        first = min(over)
        raise PipelineError(
            f"{source}: line {first + 1}: {lengths[first]} tokens, more than train.max_length {train.max_length} "
            f"({len(over)} such records); raise train.max_length, or set train.overlong to drop or truncate"
        )
    if train.overlong == "drop":
        if len(over) == len(rows):
            raise PipelineError(f"{source}: every record is longer than train.max_length {train.max_length} tokens")
        dropped = over
        if over:
            log.info(
                "dropped %d of %d records longer than %d tokens (train.overlong)",
                len(over),
                len(rows),
                train.max_length,
            )
    else:
        # TRL drops a record whose prompt alone fills max_length (nothing of the answer is left): so do we, so
        # that the rows and the batching's lengths stay aligned with what TRL keeps.
        dropped = {i for i, (_, prompt) in enumerate(encoded) if prompt >= train.max_length}
        if over:
            log.warning(
                "%d records longer than %d tokens are truncated, %d of them dropped as no answer token is left "
                "(train.overlong)", len(over), train.max_length, len(dropped),
            )  # fmt: skip
    return [row for i, row in enumerate(rows) if i not in dropped], len(over)


def probe_batch(tokenizer, rows: list[dict[str, Any]], size: int, max_length: int) -> dict[str, torch.Tensor]:
    """``size`` records of the most common opening (the stage's usual batch), tokenised as training does."""
    keys = [prefix_key(r["prompt"]) for r in rows]
    common = max(set(keys), key=keys.count)
    chosen = [r for r, key in zip(rows, keys, strict=True) if key == common][:size]
    encoded = [(ids, [-100] * prompt + ids[prompt:]) for ids, prompt in tokenize_records(tokenizer, chosen, max_length)]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in encoded]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in encoded]),
    }


def use_label_head(model, tokenizer, rows: list[dict[str, Any]], train: TrainParams) -> bool:
    """Whether training may run the label-head forward: the model projects its last hidden state plainly, and the
    label-head loss equals the model's own on two of the stage's records."""
    reason = None
    if not supports_label_head(model):
        reason = "the model scales or caps its logits"
    else:
        batch = {k: v.to(model.device) for k, v in probe_batch(tokenizer, rows, 2, train.max_length).items()}
        if not label_head_agrees(model, batch):
            reason = f"the label-head loss differs from {type(model).__name__}'s own loss on two records"
    if reason is None:
        return True
    log.warning("fallback: the model's own forward (no label head, no shared prefix): %s", reason)
    return False


def measure_precision(
    model, tokenizer, rows, lora: LoraParams, train: TrainParams, label_head: bool = True, layers: int | None = None
) -> PrecisionChoice:
    """Time the stage's forward and backward (LoRA, label head) in fp32 and in bf16 autocast; the faster wins.

    The probe runs the first ``layers`` decoder layers (``PROBE_LAYERS`` if None): every layer has the same shapes,
    so a few time the precisions as the whole stack does, in a fraction of the time. The LoRA layers are added for
    the probe and removed after it, and the random state is restored, so training runs exactly as it would with the
    chosen precision pinned.
    """
    from peft import get_peft_model

    batch = probe_batch(tokenizer, rows, min(train.batch_size, PROBE_ROWS), train.max_length)
    shared = use_shared_prefix(train, label_head, quiet=True)
    with torch.random.fork_rng(devices=[]), first_layers(model, layers or PROBE_LAYERS) as probed:
        peft_model = get_peft_model(model, lora_config(lora))
        if label_head:
            add_label_head(model)
        use_mask_dropout(peft_model)
        peft_model.train()

        def step(precision: str, rows: int = len(batch["input_ids"])) -> None:
            rows_batch = {key: value[:rows] for key, value in batch.items()}
            passes = split_rows(rows_batch, pass_tokens(train, precision), shared)  # as training runs them
            for inputs in passes:
                prefix = shared_prefix_length(inputs["input_ids"], inputs["labels"]) if shared else 0
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = peft_model(
                        **inputs, **({"label_head": True, "prefix_length": prefix} if label_head else {})
                    ).loss
                loss.backward()
            peft_model.zero_grad(set_to_none=True)

        timer = step_timer(
            step,
            len(batch["input_ids"]),
            warm_up=lambda precision: step(precision, WARM_UP_ROWS),
            warm_up_rows=WARM_UP_ROWS,
        )

        def measure(precision: str) -> float:
            # bf16 as training runs it: the frozen weights stored in bf16, not cast at every use.
            with frozen_linears_in_bf16(peft_model) if precision == "bf16" else contextlib.nullcontext():
                return timer(precision)

        try:
            choice = all_ranks_agree(choose_precision(measure, probe=f"forward + backward of {probed}"))
        finally:
            peft_model.unload()
            remove_label_head(model)
            vars(model).pop("peft_config", None)
    return choice


@contextlib.contextmanager
def first_layers(model, count: int) -> Iterator[str]:
    """Inside: ``model`` runs only its first ``count`` decoder layers (all of them if it has no more, or if its
    decoder keeps no ``layers`` list), and the context says which ("6 of 30 layers"); after: all of them again."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or count >= len(layers):
        yield "all layers"
        return
    decoder.layers = torch.nn.ModuleList(list(layers)[:count])
    try:
        yield f"{count} of {len(layers)} layers"
    finally:
        decoder.layers = layers


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


def resume_checkpoint(job: TrainJob, lora: LoraParams, train: TrainParams) -> Path | None:
    """The complete checkpoint of the same inputs to resume from, or None; stamps the folder with the inputs.

    Rank 0 alone looks (it deletes stale checkpoints and rewrites the stamp while it does) and sends its answer
    to the other ranks, so they all resume from the same step.
    """
    decided: list[str | None] = [None]
    if rank() == 0:
        expected = fingerprint({"lora": lora.model_dump(), "train": train.model_dump()}, job.train_file, job.base_model)
        resume = resume_point(job.checkpoints, expected)
        job.checkpoints.mkdir(parents=True, exist_ok=True)
        write_json(job.checkpoints / FINGERPRINT, expected)
        decided = [resume.name if resume else None]
        log.info("rank 0 decided: resume from %s", decided[0] or "the start")
    if launched() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(decided, src=0)
    return job.checkpoints / decided[0] if decided[0] else None


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

    fp32 activations take more memory than bf16 autocast's: the mixed set in fp32 peaked at 3,085 MiB with
    passes of 768 tokens and 2,633 MiB with 640 (AMD EPYC Zen 3, 30 steps).
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

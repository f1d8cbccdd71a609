"""``train``: the optimisation, batching, precision, launch and checkpoint settings."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from lorapipe.config.fields import Section, doc

# transformers' OptimizerNames at the pinned version (tests/test_config.py keeps the two equal); listed here so
# that validating params does not import transformers.
OPTIMIZERS = [
    "adafactor",
    "adagrad",
    "adalomo",
    "adamw_8bit",
    "adamw_anyprecision",
    "adamw_bnb_8bit",
    "adamw_torch",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "adamw_torch_fused",
    "adamw_torch_npu_fused",
    "adamw_torch_xla",
    "ademamix",
    "ademamix_8bit",
    "apollo_adamw",
    "apollo_adamw_layerwise",
    "galore_adafactor",
    "galore_adafactor_layerwise",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adamw_8bit_layerwise",
    "galore_adamw_layerwise",
    "grokadamw",
    "lion_32bit",
    "lion_8bit",
    "lomo",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop",
    "rmsprop_bnb",
    "rmsprop_bnb_32bit",
    "rmsprop_bnb_8bit",
    "schedule_free_adamw",
    "schedule_free_radam",
    "schedule_free_sgd",
    "sgd",
    "stable_adamw",
]


class TrainParams(Section):
    seed: int = doc("seed of initialisation, data order and dropout", ge=0)
    epochs: float = doc("passes over the training file", gt=0)
    max_steps: int = doc("stop after this many optimizer steps; -1: run the epochs", ge=-1)
    batch_size: int = doc("examples per device per forward pass", gt=0)
    gradient_accumulation_steps: int = doc("forward passes per optimizer step", gt=0)
    learning_rate: float = doc("peak learning rate", gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = doc("learning-rate schedule")
    warmup_ratio: float = doc("share of the steps spent warming up the learning rate", ge=0, lt=1)
    weight_decay: float = doc("AdamW weight decay on the LoRA weights", ge=0)
    max_length: int = doc("most tokens of an example (prompt and answer)", gt=0)
    overlong: Literal["drop", "refuse", "truncate"] = doc(
        "examples longer than max_length: drop them, refuse the file, or truncate them (which cuts the answer and "
        "its end-of-turn token: the model learns not to stop); the train summary counts them"
    )
    shared_prefix: bool = doc("run the tokens all rows of a batch start with once per batch, batching alike records")
    group_by_length: bool = doc("batch examples of similar length (less padding)")
    attention: Literal["auto", "eager", "sdpa"] = doc(
        "attention kernel; auto: eager on a CPU (faster here), sdpa on GPU"
    )
    optim: str = doc("optimizer on CUDA (transformers' names, e.g. paged_adamw_32bit)")
    cpu_optim: str = doc("optimizer that replaces a CUDA-only optim (paged or bitsandbytes) on a CPU")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = doc("auto: fp16 on CUDA, cpu_precision on a CPU")
    cpu_precision: Literal["auto", "bf16", "fp32"] = doc(
        "precision on a CPU: auto (the faster on this CPU, timed before training), bf16 autocast or fp32"
    )
    quantization: Literal["auto", "4bit", "none"] = doc("auto / 4bit: 4-bit nf4 QLoRA on CUDA; plain LoRA on a CPU")
    pass_tokens: int | None = doc(
        "most tokens one forward/backward pass runs; a larger batch runs in passes of fewer rows "
        "(the same update, less memory); null: no limit",
        gt=0,
    )
    fp32_pass_tokens: int | None = doc(
        "pass_tokens when training in fp32, whose activations take more memory than bf16 autocast's; null: pass_tokens",
        gt=0,
    )
    gradient_checkpointing: bool = doc(
        "recompute activations in backward (less memory, slower; turns shared_prefix off)"
    )
    processes: int = doc("training processes; more than 1 runs under accelerate launch with accelerate_config", gt=0)
    machines: int = doc(
        "machines the training processes span; more than 1: one accelerate launch per machine, started through the "
        "Ray cluster at RAY_ADDRESS, with processes / machines processes each",
        gt=0,
    )
    accelerate_config: str = doc(
        "the accelerate config file used when processes > 1 (configs/accelerate/); it goes into the stage's command,"
        " so no spaces or shell characters",
        pattern=r"^[A-Za-z0-9_./@+-]+$",
    )
    logging_steps: int = doc("log loss and learning rate every this many optimizer steps", gt=0)
    eval_steps: int = doc(
        "score the validation tweets (data.split.valid_size) every this many optimizer steps and at the end", gt=0
    )
    save_steps: int = doc("save a resumable checkpoint every this many optimizer steps", gt=0)
    save_total_limit: int = doc("keep this many newest checkpoints", gt=0)

    @model_validator(mode="after")
    def _processes_fill_the_machines(self) -> TrainParams:
        if self.processes % self.machines:
            raise ValueError(f"processes ({self.processes}) must be a multiple of machines ({self.machines})")
        return self

    @field_validator("optim", "cpu_optim")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError("is not an optimizer transformers knows (e.g. adamw_torch, paged_adamw_32bit)")
        return value

"""Before training: whether the label-head forward may run, and which CPU precision is faster, timed on the stage's
own forward and backward over the first decoder layers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from lorapipe.config import LoraParams, TrainParams
from lorapipe.host import PrecisionChoice, all_ranks_agree, choose_precision, step_timer
from lorapipe.models.loading import frozen_linears_in_bf16
from lorapipe.training.batching import prefix_key, split_rows
from lorapipe.training.build import lora_config, pass_tokens, use_shared_prefix
from lorapipe.training.fitting import tokenize_records
from lorapipe.training.label_head import (
    add_label_head,
    label_head_agrees,
    remove_label_head,
    shared_prefix_length,
    supports_label_head,
    use_mask_dropout,
)

log = logging.getLogger(__name__)


# The timed batch has the stage's rows (up to 16: fewer rows are dominated by per-layer overheads, which hide
# bf16's lead), run in the stage's passes; the untimed warm-up runs 2 of them.
PROBE_ROWS, WARM_UP_ROWS = 16, 2
# The probe runs the first 6 decoder layers: they time the two precisions as the whole stack does in a quarter of
# the time, where 3 let the embeddings and the head weigh too much (docs/your-machine.md).
PROBE_LAYERS = 6


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

"""The training forward: the LM head on label positions only, and the batch's shared prefix run once.

Three costs of a plain causal-LM forward are larger than completion-only training of short answers needs:

* the LM head (hidden -> vocabulary) on every position, when only the few answer positions carry
  loss (TRL's chunked head scores every position on a CPU);
* the tokens every row of the batch starts with (the system turn and the instruction up to the tweet),
  computed once per row;
* PEFT's LoRA dropout, ``torch.nn.functional.dropout`` on every adapted layer's input, whose random
  draws cost about a fifth of a training step on a CPU. :class:`MaskDropout` is the same dropout (keep
  with probability 1 - p, scale by 1 / (1 - p)) with its mask cut from random integers instead.

:func:`add_label_head` patches a causal LM so that ``model(..., label_head=True, labels=...)`` runs the
shared prefix once (batch 1) with a KV cache, broadcasts its keys and values to the rows with
``expand`` (no copy; autograd sums the rows' gradients back), runs only the suffixes with positions
that continue after the prefix, and projects only the hidden states that predict a label. The loss
and the gradients equal those of the plain padded batch (``tests/test_label_head.py``); the call goes
through the model's own ``forward`` so PEFT and DDP wrappers see it as one forward pass.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch

from lorapipe.decoding.cache_edits import broadcast_rows


@dataclass
class LabelHeadOutput:
    """Summed over the label tokens of the batch: the loss (divided by ``num_items_in_batch``), counts for logging."""

    loss: torch.Tensor
    label_tokens: torch.Tensor
    correct_tokens: torch.Tensor
    prefix_length: int


def shared_prefix_length(input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """How many leading tokens every row shares, ending before the last prompt token of the earliest answer.

    The hidden state of the token before each label must come from the suffix pass, so the prefix stops
    one token short of the first position that carries a label in any row. 0 when there is nothing to share.
    """
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0).long()
    common = int(same.cumprod(dim=0).sum())
    has_label = labels != -100
    if not has_label.any():
        return 0
    first_label = int(has_label.long().argmax(dim=1)[has_label.any(dim=1)].min())
    return max(0, min(common, first_label - 1, input_ids.shape[1] - 1))


def _backbone_hidden(backbone, input_ids, attention_mask, prefix_length: int) -> torch.Tensor:
    """Last hidden states of positions ``prefix_length`` onwards, the prefix run once if it is not empty."""
    if prefix_length == 0:
        return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows, width = input_ids.shape
    prefix = backbone(
        input_ids=input_ids[:1, :prefix_length], attention_mask=attention_mask[:1, :prefix_length], use_cache=True
    )
    cache = broadcast_rows(prefix.past_key_values, rows)
    positions = torch.arange(prefix_length, width, device=input_ids.device).expand(rows, -1)
    return backbone(
        input_ids=input_ids[:, prefix_length:],
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state


def add_label_head(model) -> None:
    """Patch ``model`` (a causal LM, before or after PEFT wraps it) with the label-head forward above."""
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, label_head: bool = False, prefix_length: int = 0, num_items_in_batch=None, **kwargs):
        if not label_head:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_forward(*args, **kwargs)
        input_ids, attention_mask, labels = kwargs["input_ids"], kwargs["attention_mask"], kwargs["labels"]
        hidden = _backbone_hidden(self.base_model, input_ids, attention_mask, prefix_length)
        # hidden[:, j] is position prefix_length + j and predicts the token after it.
        targets = labels[:, prefix_length + 1 :]
        wanted = targets != -100
        head = self.get_output_embeddings()
        logits = head(hidden[:, :-1][wanted].to(head.weight.device)).float()
        chosen = targets[wanted].to(logits.device)
        loss_sum = torch.nn.functional.cross_entropy(logits, chosen, reduction="sum")
        count = wanted.sum()
        denominator = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return LabelHeadOutput(
            loss=loss_sum / denominator,
            label_tokens=count.detach(),
            correct_tokens=(logits.detach().argmax(-1) == chosen).sum(),
            prefix_length=prefix_length,
        )

    model.forward = types.MethodType(forward, model)


def remove_label_head(model) -> None:
    """Undo :func:`add_label_head`: the model's own forward again."""
    vars(model).pop("forward", None)


class MaskDropout(torch.nn.Module):
    """Inverted dropout whose mask comes from random integers: ``nn.Dropout``'s distribution, cheaper on a CPU.

    Each drawn int64 gives four 16-bit lanes; 15 uniform bits of each (``random_`` leaves the int64 sign bit 0)
    are compared with ``p`` rounded to 1/32768: one random draw per four entries where ``torch.rand`` and
    ``nn.Dropout``'s Bernoulli draw one each (what it saves: docs/ablation.md).
    """

    LEVELS = 1 << 15

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * self.LEVELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if self.threshold >= self.LEVELS:  # p rounds to 1: every entry dropped (nn.Dropout(1.0) gives zeros too)
            return x * 0.0
        size = x.numel()
        words = torch.empty((size + 3) // 4, dtype=torch.int64, device=x.device).random_()
        lanes = words.view(torch.int16)[:size].view(x.shape) & (self.LEVELS - 1)
        return x.mul(self.LEVELS / (self.LEVELS - self.threshold)).masked_fill_(lanes < self.threshold, 0.0)


def use_mask_dropout(model) -> int:
    """Replace the LoRA dropout modules of a PEFT model with :class:`MaskDropout`; how many were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if isinstance(dropout, torch.nn.Dropout):
                    dropouts[name] = MaskDropout(dropout.p)
                    replaced += 1
    return replaced


def supports_label_head(model) -> bool:
    """Models whose logits are a plain projection of the last hidden state (no soft-capping or scaling)."""
    config = model.config.get_text_config()
    return not any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))


def label_head_agrees(model, batch: dict[str, torch.Tensor], tolerance: float = 1e-4) -> bool:
    """Whether the label-head loss equals the model's own loss on ``batch`` (no dropout, no grad).

    A model that transforms its logits in a way :func:`supports_label_head` does not know (Granite divides them
    by ``logits_scaling``) fails here, once at the start, instead of training on another loss.
    """
    was_training = model.training
    add_label_head(model)
    model.eval()
    try:
        with torch.no_grad():
            ours = model(**batch, label_head=True).loss.float()
            own = model(**batch).loss.float()
    finally:
        remove_label_head(model)
        model.train(was_training)
    return bool(torch.isclose(ours, own, rtol=tolerance, atol=tolerance))

"""TRL's SFTTrainer with this project's training forward and batching.

SFTTrainer keeps what it does well: tokenising prompt/completion records, the completion mask,
checkpoints, resumption, logging callbacks, distributed launch. Two things change:

* the loss: :mod:`lorapipe.training.label_head` (LM head on label positions only, shared prefix once per batch)
  instead of TRL's chunked head, which on a CPU projects every position onto the vocabulary;
* the order: :mod:`lorapipe.training.batching` groups alike records into batches when the prefix is shared;
* LoRA dropout with a cheaper mask (:class:`~lorapipe.training.label_head.MaskDropout`);
* memory: a batch whose forward would run more than ``pass_tokens`` tokens is split into forward/backward
  passes of fewer rows (:func:`split_rows`), each loss divided by the whole batch's label count, so the
  gradients add up to the whole batch's. Activations are about 1 MiB per token here (bf16 autocast; 2 in
  fp32): a batch of 16 instructions of 256 tokens held 5 GiB of them in one pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from trl import SFTTrainer

from lorapipe.training.batching import GroupedSampler, split_rows
from lorapipe.training.label_head import add_label_head, shared_prefix_length, use_mask_dropout

log = logging.getLogger(__name__)


class LabelHeadSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss comes from the label-head forward; ``group_keys`` (one per example) turn on grouping."""

    def __init__(
        self,
        *args,
        shared_prefix: bool,
        group_keys: Sequence[str] | None = None,
        pass_tokens: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.shared_prefix = shared_prefix
        self.pass_tokens = pass_tokens
        self.split_batches = 0
        self.group_keys = list(group_keys) if group_keys is not None else None
        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_label_head(causal_lm)
        use_mask_dropout(self.model)
        self.prefix_tokens_saved = 0

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_keys is None or dataset is None:
            return super()._get_train_sampler(train_dataset)
        lengths = [len(ids) for ids in dataset["input_ids"]]
        if len(lengths) != len(self.group_keys):  # a record TRL dropped: the keys would name other rows
            raise RuntimeError(f"{len(self.group_keys)} group keys for {len(lengths)} tokenised records")
        # Batches of the global size: each process takes its share of one, as one process would take all of it.
        return GroupedSampler(
            self.group_keys,
            lengths,
            self.args.per_device_train_batch_size * self.args.world_size,
            self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            self.args.train_sampling_strategy == "group_by_length",
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        passes = split_rows(inputs, self.pass_tokens, self.shared_prefix)
        if len(passes) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        self.split_batches += 1
        if num_items_in_batch is None:  # each pass divides by the whole batch's label count, not its own
            num_items_in_batch = (inputs["labels"][:, 1:] != -100).sum()
        total = None
        for index, part in enumerate(passes):
            # Under DDP the gradients are reduced once, after the last pass.
            last = index == len(passes) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = super().training_step(model, part, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        prefix = shared_prefix_length(inputs["input_ids"], inputs["labels"]) if self.shared_prefix else 0
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=inputs["labels"],
            label_head=True,
            prefix_length=prefix,
            num_items_in_batch=num_items_in_batch,
        )
        loss = outputs.loss
        # As Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP averages the gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self.prefix_tokens_saved += prefix * (inputs["input_ids"].shape[0] - 1)
        labelled = self.accelerator.gather_for_metrics(outputs.label_tokens).sum()
        correct = self.accelerator.gather_for_metrics(outputs.correct_tokens).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / labelled).item() if labelled > 0 else 0.0)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

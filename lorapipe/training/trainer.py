"""TRL's SFTTrainer with this project's training forward and batching.

SFTTrainer keeps what it does well: tokenising prompt/completion records, the completion mask,
checkpoints, resumption, logging callbacks, distributed launch. Two things change:

* the loss: :mod:`lorapipe.training.label_head` (LM head on label positions only, shared prefix once per batch)
  instead of TRL's chunked head, which on a CPU projects every position onto the vocabulary;
* the order: :mod:`lorapipe.training.batching` groups alike records into batches when the prefix is shared;
* LoRA dropout with a cheaper mask (:class:`~lorapipe.training.label_head.MaskDropout`);
* memory: a batch whose forward would run more than ``pass_tokens`` tokens is split into forward/backward
  passes of fewer rows (:func:`split_rows`), each loss divided by the whole batch's label count, so the
  gradients add up to the whole batch's: a batch of long instructions in one pass held several GiB of
  activations (docs/your-machine.md). Under DDP the ranks agree on
  the number of passes (the most any rank needs), since each pass runs collectives that must pair up.

Three paths are private to TRL or transformers (``_metrics``, ``_total_train_tokens``, ``_get_train_sampler``);
:func:`check_private_paths` checks them when the trainer is built, so a library update that changes them falls
back with one warning or stops with one line, never silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
import transformers
import trl
from trl import SFTTrainer

from lorapipe.errors import PipelineError
from lorapipe.training.batching import GroupedSampler, pass_count, split_rows, take_rows
from lorapipe.training.label_head import add_label_head, shared_prefix_length, use_mask_dropout

log = logging.getLogger(__name__)

IDLE_PASS = "lorapipe_idle_pass"  # marks a pass a rank runs only to keep step with the others; its loss counts zero


@dataclasses.dataclass(frozen=True)
class PrivatePaths:
    """Which of TRL's private logging attributes this trainer may use."""

    metrics: bool  # SFTTrainer._metrics: per-mode lists of figures that SFTTrainer.log averages
    tokens: bool  # SFTTrainer._total_train_tokens: the count that num_tokens logs


def check_private_paths(trainer: SFTTrainer, grouping: bool) -> PrivatePaths:
    """The private paths of TRL and transformers this trainer relies on, checked once, when it is built.

    Without ``transformers.Trainer._get_train_sampler`` (or if the training dataloader no longer asks it for the
    sampler) prefix grouping would silently not apply, so grouping stops with one line; TRL's logging attributes
    only feed two logged figures, so a changed one is skipped with one warning.
    """
    if grouping:
        hook = getattr(SFTTrainer, "_get_train_sampler", None)
        loader = getattr(SFTTrainer, "get_train_dataloader", None)
        names = getattr(getattr(inspect.unwrap(loader), "__code__", None), "co_names", ()) if loader else ()
        if not callable(hook) or "_get_train_sampler" not in names:
            raise PipelineError(
                f"transformers {transformers.__version__}: transformers.Trainer._get_train_sampler is missing or no "
                "longer picks the training sampler, so prefix-grouped batches cannot be set "
                "(pin the transformers version in requirements, or set train.shared_prefix: false)"
            )
    metrics = getattr(trainer, "_metrics", None)
    metrics_ok = isinstance(metrics, MutableMapping) and all(_figures(metrics, mode) for mode in ("train", "eval"))
    if not metrics_ok:
        log.warning(
            "fallback: trl %s's SFTTrainer._metrics is not a dict of train/eval figures (%s): "
            "mean_token_accuracy and num_tokens are not logged",
            trl.__version__,
            type(metrics).__name__,
        )
    tokens = getattr(trainer, "_total_train_tokens", None)
    tokens_ok = isinstance(tokens, int | float) and not isinstance(tokens, bool)
    if not tokens_ok:
        log.warning(
            "fallback: trl %s's SFTTrainer._total_train_tokens is not a number (%s): num_tokens is not logged",
            trl.__version__,
            type(tokens).__name__,
        )
    return PrivatePaths(metrics=metrics_ok, tokens=tokens_ok)


def _figures(metrics: MutableMapping, mode: str) -> bool:
    """Whether ``metrics[mode]`` is a dict of figures (a defaultdict of modes makes its own)."""
    try:
        return isinstance(metrics[mode], MutableMapping)
    except KeyError:
        return False


def agreed_pass_count(count: int, device: torch.device) -> int:
    """The most passes any rank needs (``count`` in one process): every rank runs that many, because each pass
    runs collectives (DDP's buffer broadcast, gather_for_metrics) that must pair up across ranks."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    if torch.distributed.get_world_size() == 1:
        return count
    most = torch.tensor([count], device=device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item())


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
        self.joined_passes = 0  # batches in which this rank ran extra passes to keep step with another rank
        self.private = check_private_paths(self, grouping=self.group_keys is not None)

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
        own = pass_count(inputs, self.pass_tokens, self.shared_prefix)
        count = agreed_pass_count(own, self.accelerator.device)
        if count == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        self.split_batches += 1
        if count > own:
            if not self.joined_passes:
                log.info(
                    "rank %d: a batch its own split would run in %d pass(es) runs in %d, as another rank's needs "
                    "(said once)",
                    self.accelerator.process_index,
                    own,
                    count,
                )
            self.joined_passes += 1
        passes = split_rows(inputs, self.pass_tokens, self.shared_prefix, passes=count)
        # Fewer rows than passes: one row again with its loss times zero keeps this rank in every pass's
        # collectives without changing its gradients.
        passes += [{**take_rows(passes[-1], 0, 1), IDLE_PASS: True}] * (count - len(passes))
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
        idle = bool(inputs.get(IDLE_PASS, False))
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
        if idle:  # the same graph (DDP's gradient hooks fire) with zero gradients, and no figures of its own
            loss = loss * 0.0
        else:
            self.prefix_tokens_saved += prefix * (inputs["input_ids"].shape[0] - 1)
        self.log_figures(mode, inputs, outputs, counted=0 if idle else 1)
        return (loss, outputs) if return_outputs else loss

    def log_figures(self, mode: str, inputs: dict[str, Any], outputs: Any, counted: int) -> None:
        """mean_token_accuracy and num_tokens into TRL's figures, where its private attributes are as expected.

        Every rank calls this for every pass (``counted`` 0 for an idle pass): the gathers pair up across ranks.
        """
        if not self.private.metrics:
            return
        labelled = self.accelerator.gather_for_metrics(outputs.label_tokens * counted).sum()
        correct = self.accelerator.gather_for_metrics(outputs.correct_tokens * counted).sum()
        figures = self._metrics[mode]
        if counted or labelled > 0:  # an idle pass alone (one process) has no accuracy to average in
            figures.setdefault("mean_token_accuracy", []).append((correct / labelled).item() if labelled > 0 else 0.0)
        if not self.private.tokens:
            return
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum() * counted).sum().item()
            self._total_train_tokens += tokens
        figures["num_tokens"] = [self._total_train_tokens]

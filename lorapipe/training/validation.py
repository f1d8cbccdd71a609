"""Held-out accuracy while training: the validation tweets scored by label likelihood every ``train.eval_steps``.

The validation split comes from the training pool (instructify draws it after the training tweets, never
from the test set). Scoring is the evaluation's own label scoring (:func:`lorapipe.decoding.score_labels`,
the shared prefix computed once per batch) on the model being trained, in its training precision, dropout off.
Accuracy and macro F1 go through ``Trainer.log``, so transformers' DVCLive callback writes them beside the loss
(``eval/accuracy``, ``eval/macro_f1``) and ``dvc plots`` draws them against the optimizer step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from lorapipe.classification import classification_metrics
from lorapipe.decoding import score_labels

log = logging.getLogger(__name__)

BATCH_SIZE = 32  # validation tweets per scoring batch (eval.batch_size's default)


class Validation(TrainerCallback):
    """Scores the validation records every ``every`` optimizer steps and at the last step; logs through the
    trainer (set :attr:`trainer` once it exists)."""

    def __init__(self, tokenizer, rows: Sequence[dict[str, Any]], labels: Sequence[str], every: int) -> None:
        self.tokenizer, self.labels, self.every = tokenizer, tuple(labels), every
        self.prompts = [r["prompt"] for r in rows]
        self.actual = [r["label"] for r in rows]
        self.trainer = None
        self.seconds = 0.0
        self.last: dict[str, float] = {}

    def score(self, model) -> dict[str, float]:
        """Accuracy and macro F1 of the model's likeliest labels, dropout off, in the trainer's precision."""
        started = time.perf_counter()
        training = model.training
        model.eval()
        try:
            with self.trainer.accelerator.autocast():
                scores = score_labels(model, self.tokenizer, self.prompts, self.labels, BATCH_SIZE)
        finally:
            model.train(training)
        predicted = [max(s, key=s.get) for s in scores]
        figures = classification_metrics(self.actual, predicted, self.labels)
        self.seconds += time.perf_counter() - started
        self.last = {"accuracy": figures["accuracy"], "macro_f1": figures["macro_f1"]}
        return self.last

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        figures = self.score(model)
        log.info(
            "step %d: validation accuracy %.3f, macro F1 %.3f (%d tweets)",
            state.global_step,
            figures["accuracy"],
            figures["macro_f1"],
            len(self.actual),
        )
        # In eval mode SFTTrainer.log adds no training metrics (it would clear those of the next loss entry).
        model.eval()
        try:
            self.trainer.log({f"eval_{name}": value for name, value in figures.items()})
        finally:
            model.train()

    def summary(self) -> dict[str, Any]:
        return {"examples": len(self.actual), "every_steps": self.every, **self.last, "seconds": round(self.seconds, 1)}

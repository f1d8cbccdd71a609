"""The private paths of TRL and transformers the trainer uses: a changed one falls back with one warning or stops
with one line naming it; none is skipped silently, and with all of them as expected the logging is unchanged."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers
from trl import SFTTrainer

from conftest import instruction_rows, sentiment_rows, tiny_params
from lorapipe.config import parse_params
from lorapipe.errors import PipelineError
from lorapipe.models.loading import choose_hardware, load_causal_lm, load_tokenizer
from lorapipe.training.batching import prefix_key
from lorapipe.training.build import lora_config, sft_config
from lorapipe.training.trainer import LabelHeadSFTTrainer


@pytest.fixture(scope="module")
def params():
    raw = tiny_params(Path("m"), Path("t.csv"), Path("i.json"))
    raw["lora"].update(dropout=0.0)
    raw["train"].update(cpu_precision="fp32")
    return parse_params(raw)


@pytest.fixture(scope="module")
def rows(params) -> list[dict]:
    return sentiment_rows(params.prompt, 2) + instruction_rows(params.prompt, 2)


def make_trainer(tiny_model: Path, params, rows: list[dict], grouping: bool = True) -> LabelHeadSFTTrainer:
    from datasets import Dataset

    hardware = choose_hardware(params.train, cuda=False)
    torch.manual_seed(0)
    return LabelHeadSFTTrainer(
        model=load_causal_lm(tiny_model, attention="eager"),
        args=sft_config(params.train, hardware, Path("/tmp/unused")),
        train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]),
        processing_class=load_tokenizer(tiny_model),
        peft_config=lora_config(params.lora),
        shared_prefix=True,
        group_keys=[prefix_key(r["prompt"]) for r in rows] if grouping else None,
    )


def step(trainer: LabelHeadSFTTrainer) -> tuple[float, dict]:
    """One training step on the whole tiny set; its loss and the attention mask's token count."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    labelled = (batch["labels"][:, 1:] != -100).sum()
    return trainer.training_step(trainer.model, batch, labelled).item(), batch


def private_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "SFTTrainer._" in r.getMessage()]


def test_with_the_private_paths_as_expected_nothing_is_said_and_both_figures_are_logged(
    tiny_model, params, rows, caplog
):
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(tiny_model, params, rows)
        _, batch = step(trainer)
    assert private_warnings(caplog) == []
    figures = trainer._metrics["train"]
    assert len(figures["mean_token_accuracy"]) == 1 and 0.0 <= figures["mean_token_accuracy"][0] <= 1.0
    assert figures["num_tokens"] == [int(batch["attention_mask"].sum())]
    trainer.log({"loss": 1.0})
    assert {"mean_token_accuracy", "num_tokens"} <= trainer.state.log_history[-1].keys()


def test_without_get_train_sampler_grouping_stops_with_one_line_naming_it(tiny_model, params, rows, monkeypatch):
    monkeypatch.delattr(transformers.Trainer, "_get_train_sampler")
    with pytest.raises(PipelineError) as raised:
        make_trainer(tiny_model, params, rows)
    message = str(raised.value)
    assert "\n" not in message
    assert "transformers.Trainer._get_train_sampler" in message and transformers.__version__ in message


def test_a_dataloader_that_no_longer_asks_for_the_sampler_stops_grouping_with_one_line(
    tiny_model, params, rows, monkeypatch
):
    def get_train_dataloader(self):  # a future version that picks its sampler some other way
        return torch.utils.data.DataLoader(self.train_dataset, batch_size=self._train_batch_size)

    monkeypatch.setattr(transformers.Trainer, "get_train_dataloader", get_train_dataloader)
    with pytest.raises(PipelineError, match=r"transformers\.Trainer\._get_train_sampler"):
        make_trainer(tiny_model, params, rows)


def test_without_grouping_the_sampler_hook_is_not_needed(tiny_model, params, rows, monkeypatch):
    monkeypatch.delattr(transformers.Trainer, "_get_train_sampler")
    trainer = make_trainer(tiny_model, params, rows, grouping=False)
    assert trainer.group_keys is None


def with_attribute(monkeypatch, name: str, value: object) -> None:
    """SFTTrainer built with ``name`` replaced by ``value`` (removed where ``value`` is ``delattr``)."""
    built = SFTTrainer.__init__

    def changed(self, *args, **kwargs) -> None:
        built(self, *args, **kwargs)
        if value is delattr:
            delattr(self, name)
        else:
            setattr(self, name, value)

    monkeypatch.setattr(SFTTrainer, "__init__", changed)


@pytest.mark.parametrize("value", [delattr, ["not", "a", "dict"], {"train": []}], ids=["missing", "list", "modes"])
def test_a_changed_metrics_dict_is_skipped_with_one_warning(tiny_model, params, rows, monkeypatch, caplog, value):
    expected, _ = step(make_trainer(tiny_model, params, rows))
    with_attribute(monkeypatch, "_metrics", value)
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(tiny_model, params, rows)
        losses = [step(trainer)[0] for _ in range(2)]
    said = private_warnings(caplog)
    assert len(said) == 1 and "SFTTrainer._metrics" in said[0], said
    assert losses[0] == pytest.approx(expected, rel=1e-6)  # the step itself is unchanged
    assert getattr(trainer, "_metrics", delattr) == value  # left as it was: nothing written into it


@pytest.mark.parametrize("value", [delattr, None], ids=["missing", "none"])
def test_a_changed_token_count_skips_num_tokens_only_with_one_warning(
    tiny_model, params, rows, monkeypatch, caplog, value
):
    with_attribute(monkeypatch, "_total_train_tokens", value)
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(tiny_model, params, rows)
        for _ in range(2):
            step(trainer)
    said = private_warnings(caplog)
    assert len(said) == 1 and "SFTTrainer._total_train_tokens" in said[0], said
    figures = trainer._metrics["train"]
    assert len(figures["mean_token_accuracy"]) == 2 and "num_tokens" not in figures
    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    assert "mean_token_accuracy" in logged and "num_tokens" not in logged

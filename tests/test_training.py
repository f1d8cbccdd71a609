import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import NEGATIVE, POSITIVE, tiny_params
from lorapipe.config import parse_params
from lorapipe.io import read_json, write_jsonl
from lorapipe.modeling import choose_hardware, load_for_inference, load_tokenizer
from lorapipe.prompts import record, sentiment_prompt
from lorapipe.training import TrainJob, lora_config, sft_config, train_adapter


@pytest.fixture()
def params(tmp_path):
    return parse_params(tiny_params(tmp_path, tmp_path, tmp_path))


def sentiment_rows(params, n: int = 32) -> list[dict]:
    words = [(w, "positive") for w in POSITIVE] + [(w, "negative") for w in NEGATIVE]
    return [
        record(sentiment_prompt(words[i % len(words)][0], params.prompt), words[i % len(words)][1]) for i in range(n)
    ]


def make_job(tmp_path: Path, base: Path, params, name: str = "sentiment") -> TrainJob:
    train_file = tmp_path / "train.jsonl"
    if not train_file.exists():
        write_jsonl(train_file, sentiment_rows(params))
    return TrainJob(
        name=name,
        base_model=base,
        train_file=train_file,
        adapter_out=tmp_path / "adapters" / name,
        checkpoints=tmp_path / "checkpoints" / name,
        live_dir=tmp_path / "dvclive" / name,
        summary_out=tmp_path / "metrics" / f"train_{name}.json",
    )


def trainer_for(tiny_model, params, rows):
    from datasets import Dataset
    from trl import SFTTrainer

    hardware = choose_hardware(params.train, cuda=False)
    model = load_for_inference(tiny_model).train()
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    return SFTTrainer(
        model=model,
        args=sft_config(params.train, hardware, Path("/tmp/unused")),
        train_dataset=dataset,
        processing_class=load_tokenizer(tiny_model),
        peft_config=lora_config(params.lora),
    )


def test_loss_counts_the_answer_and_the_end_of_turn_only(tiny_model, params):
    tokenizer = load_tokenizer(tiny_model)
    rows = sentiment_rows(params, 4)
    trainer = trainer_for(tiny_model, params, rows)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"], strict=True):
        trained = ids[labels != -100].tolist()
        answer = tokenizer(row["completion"][0]["content"], add_special_tokens=False)["input_ids"]
        # The answer, then <|im_end|> (== pad and eos here) and the newline the template writes after it.
        assert trained[: len(answer)] == answer
        assert trained[len(answer)] == end_of_turn
        assert tokenizer.decode(trained) == row["completion"][0]["content"] + "<|im_end|>\n"
    # Padding (the same token id as <|im_end|>) never carries loss.
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["labels"][padded] == -100).all()


def test_cpu_fallback_is_logged_once_per_change(params, caplog):
    hardware = choose_hardware(params.train, cuda=False)
    assert (hardware.device, hardware.precision, hardware.quantize_4bit, hardware.optim) == (
        "cpu",
        "bf16",
        False,
        "adamw_torch",
    )
    assert len(hardware.fallbacks) == 3
    assert choose_hardware(params.train, cuda=True).quantize_4bit
    assert choose_hardware(params.train, cuda=True).optim == "paged_adamw_32bit"
    fp32 = params.train.model_copy(update={"cpu_precision": "fp32", "optim": "adamw_torch", "quantization": "none"})
    assert choose_hardware(fp32, cuda=False).precision == "fp32"
    assert len(choose_hardware(fp32, cuda=False).fallbacks) == 1


def test_training_lowers_the_loss_and_the_adapter_reloads_and_changes_output(tmp_path, tiny_model, params, caplog):
    train = params.train.model_copy(update={"epochs": 3, "learning_rate": 1e-2})
    lora = params.lora.model_copy(update={"target_modules": "all-linear"})
    job = make_job(tmp_path, tiny_model, params)
    with caplog.at_level(logging.WARNING):
        summary = train_adapter(job, lora, train)
    assert any("fallback: no CUDA" in message for message in caplog.messages)
    curve = (job.live_dir / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    losses = [float(line.split("\t")[-1]) for line in curve[1:]]
    assert losses[-1] < losses[0] * 0.7
    assert read_json(job.summary_out) == summary
    assert summary["steps"] == 24 and summary["tokens_seen"] > 0 and summary["peak_memory_mib"] > 0
    assert (job.adapter_out / "adapter_model.safetensors").exists()
    assert (job.adapter_out / "tokenizer.json").exists()

    tokenizer = load_tokenizer(tiny_model)
    inputs = tokenizer.apply_chat_template(
        sentiment_rows(params, 1)[0]["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        base_logits = load_for_inference(tiny_model)(**inputs).logits
        tuned_logits = load_for_inference(tiny_model, job.adapter_out)(**inputs).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)


def test_same_params_give_the_same_adapter(tmp_path, tiny_model, params):
    train = params.train.model_copy(update={"max_steps": 3})
    first = make_job(tmp_path / "a", tiny_model, params)
    second = make_job(tmp_path / "b", tiny_model, params)
    train_adapter(first, params.lora, train)
    train_adapter(second, params.lora, train)
    a = load_file(first.adapter_out / "adapter_model.safetensors")
    b = load_file(second.adapter_out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model, params, monkeypatch):
    from transformers import TrainerCallback

    train = params.train.model_copy(update={"max_steps": 6, "save_steps": 2})
    job = make_job(tmp_path, tiny_model, params)

    class StopAfterFour(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise Interrupt

    import trl

    original = trl.SFTTrainer.__init__

    def with_interrupt(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), StopAfterFour()]
        original(self, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "__init__", with_interrupt)
    with pytest.raises(Interrupt):
        train_adapter(job, params.lora, train)
    assert not job.adapter_out.exists()
    assert sorted(p.name for p in job.checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.setattr(trl.SFTTrainer, "__init__", original)

    summary = train_adapter(job, params.lora, train)
    assert summary["resumed_from"] == "checkpoint-4" and summary["steps"] == 6

    changed = params.lora.model_copy(update={"r": 4})
    assert train_adapter(job, changed, train)["resumed_from"] is None

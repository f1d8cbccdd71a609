from pathlib import Path

import pytest
import yaml

from lorapipe.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.lora.r == 8 and params.lora.alpha == 32
    assert params.model.source.kind == "registry"


@pytest.mark.parametrize("profile", sorted((ROOT / "profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_profile_is_valid(profile):
    assert load_params(profile).train.learning_rate > 0


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("lora", "r", 0, "lora.r"),
        ("lora", "r", "eight", "lora.r"),
        ("mix", "instruction_share", 1.5, "mix.instruction_share"),
        ("train", "precision", "fp8", "train.precision"),
        ("train", "unknown_knob", 1, "train.unknown_knob"),
        ("prompt", "sentiment_template", "no placeholder", "prompt.sentiment_template"),
    ],
)
def test_bad_value_names_the_key(section, key, value, named):
    raw = raw_params()
    raw[section][key] = value
    with pytest.raises(ParamsError, match=rf"params\.yaml: {named}:"):
        parse_params(raw)


def test_bad_checksum_format_names_the_nested_key():
    raw = raw_params()
    raw["model"]["source"]["sha256"] = "abc"
    with pytest.raises(ParamsError, match=r"model\.source\.sha256"):
        parse_params(raw)


def test_hub_source_needs_a_revision():
    raw = raw_params()
    raw["model"]["source"] = {"kind": "hub", "id": "mistralai/Mistral-7B-v0.1"}
    with pytest.raises(ParamsError, match=r"model\.source\.revision"):
        parse_params(raw)


def test_missing_section_and_missing_file(tmp_path):
    raw = raw_params()
    del raw["eval"]
    with pytest.raises(ParamsError, match=r"eval: Field required"):
        parse_params(raw)
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")


def test_the_embedded_profile_is_the_default_params():
    assert (ROOT / "profiles" / "embedded.yaml").read_text() == (ROOT / "params.yaml").read_text()


def test_use_profile_validates_and_copies(tmp_path):
    from lorapipe.errors import PipelineError
    from lorapipe.profiles import use_profile

    target = tmp_path / "params.yaml"
    use_profile("study-a-mistral-7b", ROOT / "profiles", target)
    assert load_params(target).model.source.kind == "hub"
    with pytest.raises(PipelineError, match="no such profile"):
        use_profile("nope", ROOT / "profiles", target)

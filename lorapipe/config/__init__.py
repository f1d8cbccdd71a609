"""Every params.yaml key, validated once, in one place, each with the one line that says what it means.

Stages call :func:`load_params`; a wrong type (strictly: ``true`` is not a number, ``"8"`` is not an
integer), an out-of-range value or an unknown key stops them with a :class:`ParamsError` that names
the file and the key. Every key is required (a source's optional settings aside): params.yaml is the only
place a value comes from.

One module per params section (``lorapipe.config.train`` holds ``train``...); this package gathers them.
"""

from lorapipe.config.data import DataParams, InstructionsParams, SplitParams, TweetsParams
from lorapipe.config.evaluation import EvalParams
from lorapipe.config.fields import ParamsError, Section, doc, placeholders
from lorapipe.config.lora import LoraParams
from lorapipe.config.mix import MixParams
from lorapipe.config.model import HubSource, LocalSource, ModelParams, RegistrySource, Source
from lorapipe.config.params import Params, load_params, parse_params
from lorapipe.config.prompt import PromptParams
from lorapipe.config.report import ReferenceRow, ReportParams
from lorapipe.config.train import OPTIMIZERS, TrainParams

__all__ = [
    "OPTIMIZERS",
    "DataParams",
    "EvalParams",
    "HubSource",
    "InstructionsParams",
    "LocalSource",
    "LoraParams",
    "MixParams",
    "ModelParams",
    "Params",
    "ParamsError",
    "PromptParams",
    "ReferenceRow",
    "RegistrySource",
    "ReportParams",
    "Section",
    "Source",
    "SplitParams",
    "TrainParams",
    "TweetsParams",
    "doc",
    "load_params",
    "parse_params",
    "placeholders",
]

"""``lora``: the adapter's rank, scale, dropout and target modules."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from lorapipe.config.fields import Section, doc


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

"""Trained adapters as they are used: on which base, checked, and on which of its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorapipe.errors import PipelineError
from lorapipe.io import read_json
from lorapipe.models.loading import load_for_inference
from lorapipe.models.model_card import CARD_FACTS, describe_source


@dataclass(frozen=True)
class ScoringBase:
    """The weights an adapter is used on: merged into the full-precision base, or unmerged on the 4-bit base it
    was trained on (a QLoRA adapter learned to correct the 4-bit weights, not the full-precision ones)."""

    quantize_4bit: bool = False
    compute_precision: str = "fp16"

    def describe(self, dtype: torch.dtype, adapter: bool) -> str:
        if self.quantize_4bit:
            return f"4-bit nf4 base ({self.compute_precision} compute), adapter unmerged as trained"
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
        return f"{name} base" + (", adapter merged" if adapter else "")

    @property
    def four_bit(self) -> str | None:
        """What :func:`lorapipe.models.loading.load_for_inference` takes: the 4-bit compute precision, or None."""
        return self.compute_precision if self.quantize_4bit else None


def scoring_base(adapter: Path | None, as_trained: bool = True, cuda: bool | None = None) -> ScoringBase:
    """Where ``adapter`` is used: on the base its training recorded (its ``card.json``), unless ``as_trained`` is
    off, which merges a QLoRA adapter into the full-precision base (as export does)."""
    card = Path(adapter) / CARD_FACTS if adapter is not None else None
    summary = read_json(card).get("summary", {}) if card is not None and card.is_file() else {}
    if not summary.get("quantized_4bit") or not as_trained:
        return ScoringBase()
    if not (torch.cuda.is_available() if cuda is None else cuda):
        raise PipelineError(
            f"{card}: summary.quantized_4bit: the adapter was trained on the 4-bit base, and scoring it as trained "
            "needs CUDA with bitsandbytes; set eval.adapter_base: merged to score it merged into the full-precision "
            "base instead"
        )
    return ScoringBase(quantize_4bit=True, compute_precision=summary.get("precision") or "fp16")


def _base_identity(manifest: dict) -> tuple[str | None, dict]:
    """What names a base model: its name and its source (hub id and revision, registry file, local path)."""
    source = {k: v for k, v in manifest.get("source", {}).items() if k not in ("format", "parameters")}
    return manifest.get("name"), source


def check_base(adapter: Path, base: Path, allow_other_base: bool = False) -> None:
    """Refuse to use ``adapter`` on ``base`` when its card records another base model (name or source).

    An adapter's low-rank update only means something on the weights it was trained on; ``allow_other_base``
    uses it anyway (a re-fetched copy of the same model from elsewhere, for example). Without a card (an adapter
    trained elsewhere) the base PEFT recorded is compared instead; without a base manifest there is nothing to
    compare.
    """
    card, manifest = Path(adapter) / CARD_FACTS, Path(base) / "manifest.json"
    if allow_other_base or not manifest.is_file():
        return
    if not card.is_file():
        check_named_base(Path(adapter), Path(base), read_json(manifest))
        return
    recorded, given = _base_identity(read_json(card).get("base_model", {})), _base_identity(read_json(manifest))
    if recorded != given:
        raise PipelineError(
            f"{card}: base_model: the adapter was trained on {recorded[0]} ({describe_source(recorded[1])}), but "
            f"{base} is {given[0]} ({describe_source(given[1])}); pass --allow-other-base to use it anyway"
        )


def check_named_base(adapter: Path, base: Path, manifest: dict) -> None:
    """An adapter with no card (trained elsewhere): the base PEFT recorded (``base_model_name_or_path``) must be
    this base, by its folder, its hub id or its name (the hub id's last part); else one line."""
    config = adapter / "adapter_config.json"
    named = (read_json(config).get("base_model_name_or_path") or "") if config.is_file() else ""
    if not named:
        return
    name, source = _base_identity(manifest)
    known = {str(base), str(base.resolve()), source.get("id"), name}
    if named in known or named.rstrip("/").rsplit("/", 1)[-1] == name:
        return
    raise PipelineError(
        f"{config}: base_model_name_or_path: the adapter names {named} as its base and has no {CARD_FACTS}, but "
        f"{base} is {name} ({describe_source(source)}); pass --allow-other-base to use it anyway"
    )


def checked_scoring_base(
    base: Path, adapter: Path | None, as_trained: bool = True, allow_other_base: bool = False
) -> ScoringBase:
    """Where ``adapter`` is used on ``base`` (:func:`scoring_base`), after :func:`check_base` has accepted the
    pair: a caller scoring several adapters checks them all with this before it loads the first."""
    if adapter is not None:
        check_base(adapter, base, allow_other_base)
    return scoring_base(adapter, as_trained)


def load_adapted(
    base: Path,
    adapter: Path | None,
    precision: str = "fp32",
    as_trained: bool = True,
    allow_other_base: bool = False,
):
    """The model to use ``adapter`` with on the weights :func:`checked_scoring_base` picks; and those weights.
    Without an adapter, the base model alone."""
    on = checked_scoring_base(base, adapter, as_trained, allow_other_base)
    return load_for_inference(base, adapter, precision, on.four_bit), on

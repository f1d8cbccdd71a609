"""``mix``: the mixed training set's size and share of instructions."""

from __future__ import annotations

from lorapipe.config.fields import Section, doc


class MixParams(Section):
    instruction_share: float = doc("the share of instruction records in the mixed training set", ge=0, le=1)
    size: int = doc("records in the mixed training set", gt=0)
    seed: int = doc("seed of the sampling and shuffling", ge=0)

"""``report``: the report's title and the published figures shown beside ours."""

from __future__ import annotations

from lorapipe.config.fields import Section, doc


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

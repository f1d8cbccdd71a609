"""What every params section is built from: a required, described field; a strict section; templates."""

from __future__ import annotations

import string
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from lorapipe.errors import PipelineError


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


def require_placeholders(template: str, wanted: set[str], optional: frozenset[str] = frozenset()) -> str:
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


Sha256 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]

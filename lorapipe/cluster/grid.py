"""A sweep's grid from ``-S`` options in DVC's own value syntax: ``-S lora.r=4,8,16 -S train.learning_rate=1e-3,2e-3``.

A comma separates values (as in ``dvc exp run --queue -S``), except inside brackets or quotes, so a list value
(``-S data.labels=[a,b]``) stays one value. Each grid point becomes one experiment, named from its values so that
the same sweep run twice names its experiments the same.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from lorapipe.errors import PipelineError

# A DVC experiment name is a Git ref's last part: no spaces, no '..', none of ~^:?*[\ and no leading '-'.
UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_.+-]+")


@dataclass(frozen=True)
class GridPoint:
    """One experiment of a sweep: its name and its ``-S`` assignments, in the order the options came."""

    name: str
    assignments: tuple[tuple[str, str], ...]

    def set_params(self) -> list[str]:
        """The point's values as ``dvc exp run`` options."""
        return [option for key, value in self.assignments for option in ("-S", f"{key}={value}")]


def split_values(text: str) -> list[str]:
    """``4,8,16`` -> ``['4', '8', '16']``; commas inside ``[]``, ``{}``, ``()`` or quotes do not split."""
    values, current, depth, quote = [], "", 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values


def parse_option(option: str) -> tuple[str, list[str]]:
    """``lora.r=4,8`` -> ``('lora.r', ['4', '8'])``; one line naming the option when it is not ``key=values``."""
    key, sep, text = option.partition("=")
    key = key.strip()
    values = split_values(text)
    if not sep or not key or any(not value for value in values):
        raise PipelineError(f"-S {option}: expected key=value or key=value1,value2 (DVC's -S syntax), e.g. lora.r=4,8")
    if len(set(values)) != len(values):
        raise PipelineError(f"-S {option}: a value is listed twice")
    return key, values


def point_name(prefix: str, assignments: tuple[tuple[str, str], ...]) -> str:
    """``sweep-lora.r-8-train.learning_rate-1e-3``: the prefix and each key's last values, made ref-safe."""
    parts = [prefix, *(f"{key}-{value}" for key, value in assignments)]
    name = UNSAFE_IN_NAME.sub("_", "-".join(parts)).replace("..", "_").strip("-.")
    return name[:200]


def expand(options: list[str], prefix: str) -> list[GridPoint]:
    """Every combination of the options' values (the last option varies fastest), each named."""
    if not options:
        raise PipelineError("no -S option: a sweep needs at least one key=value1,value2")
    parsed = [parse_option(option) for option in options]
    keys = [key for key, _ in parsed]
    if len(set(keys)) != len(keys):
        raise PipelineError(
            f"-S: {sorted({k for k in keys if keys.count(k) > 1})[0]} is given twice; list its values in one option"
        )
    points = []
    for values in itertools.product(*(values for _, values in parsed)):
        assignments = tuple(zip(keys, values, strict=True))
        points.append(GridPoint(point_name(prefix, assignments), assignments))
    names = [point.name for point in points]
    if len(set(names)) != len(names):
        raise PipelineError("-S: two grid points get the same experiment name; give values that differ in letters")
    return points

"""Which examples share a batch: alike prompts together, so a batch's shared prefix is as long as it can be.

Records whose conversation begins the same way up to the first line of the user turn (the
template's fixed text: every tweet record, say) form a group; a group's examples fill whole batches;
what is left of each group, and the records whose first line is their own (most instructions, which
share only the system turn), are batched together. Within a group, batches hold examples of similar
length. Batch order is shuffled, so training still sees groups interleaved.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from lorapipe.training.label_head import shared_prefix_length

MEGABATCH = 16  # batches sorted by length together (as transformers' LengthGroupedSampler does with 50)


def prefix_key(prompt: list[dict[str, Any]]) -> str:
    """The conversation's text up to the first line break of its last user turn."""
    *before, last = prompt
    return "\x00".join([*(m["content"] for m in before), last["content"].split("\n", 1)[0]])


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _by_length(indices: list[int], lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    rng.shuffle(indices)
    batches = []
    for mega in _chunks(indices, MEGABATCH * batch_size):
        batches += _chunks(sorted(mega, key=lambda i: -lengths[i]), batch_size)
    return batches


def grouped_batches(
    keys: Sequence[str], lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True
) -> list[list[int]]:
    """Batches of example indices: full batches of one group each, then the mixed rest; one epoch, seeded."""
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        groups[key].append(index)
    batches: list[list[int]] = []
    rest: list[int] = []
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        whole = len(members) // batch_size * batch_size
        rest += members[whole:]
        if whole:
            group = members[:whole]
            batches += _by_length(group, lengths, batch_size, rng) if group_by_length else _chunks(group, batch_size)
    rest_batches = _by_length(rest, lengths, batch_size, rng) if group_by_length else _chunks(rest, batch_size)
    full = [b for b in batches + rest_batches if len(b) == batch_size]
    partial = [b for b in batches + rest_batches if len(b) < batch_size]
    rng.shuffle(full)
    return full + partial  # at most one partial batch, last, so every batch boundary stays aligned


class GroupedSampler(Sampler[int]):
    """Yields the indices of :func:`grouped_batches` in order; a new shuffle each epoch (``set_epoch``)."""

    def __init__(
        self, keys: Sequence[str], lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool
    ) -> None:
        self.keys, self.lengths = list(keys), list(lengths)
        self.batch_size, self.seed, self.group_by_length = batch_size, seed, group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[int]:
        batches = grouped_batches(
            self.keys, self.lengths, self.batch_size, self.seed + self.epoch, self.group_by_length
        )
        for batch in batches:
            yield from batch


def pass_cost(rows: int, width: int, prefix: int) -> int:
    """Tokens a forward pass runs: the shared prefix once, then each row's suffix."""
    return prefix + rows * (width - prefix)


def pass_count(inputs: dict[str, Any], pass_tokens: int | None, shared_prefix: bool) -> int:
    """The fewest passes whose rows each run at most ``pass_tokens`` (1 if the whole batch does, or no budget)."""
    ids = inputs["input_ids"]
    rows, width = ids.shape
    prefix = shared_prefix_length(ids, inputs["labels"]) if shared_prefix else 0
    if pass_tokens is None or pass_cost(rows, width, prefix) <= pass_tokens:
        return 1
    fit = max(1, (pass_tokens - prefix) // (width - prefix))
    return math.ceil(rows / fit)


def split_rows(
    inputs: dict[str, Any], pass_tokens: int | None, shared_prefix: bool, passes: int | None = None
) -> list[dict[str, Any]]:
    """``inputs`` as one pass, or split by rows into the fewest even passes that each run at most ``pass_tokens``.

    Every tensor of shape (rows, width) is split; columns that are padding in all of a pass's rows are dropped
    (right padding: no real token attends to them). A single row longer than the budget is a pass of its own.
    With ``passes`` (ranks that agreed on a count), the rows are split into that many even passes instead, fewer
    where there are fewer rows than passes; ``pass_tokens`` is then not used.
    """
    if passes is None:
        passes = pass_count(inputs, pass_tokens, shared_prefix)
    if passes <= 1:
        return [inputs]
    rows = inputs["input_ids"].shape[0]
    size = math.ceil(rows / passes)
    return [take_rows(inputs, start, start + size) for start in range(0, rows, size)]


def take_rows(inputs: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every (rows, width) tensor, without the columns that are padding in all of them."""
    rows, width = inputs["input_ids"].shape
    part = {
        key: value[start:stop] if torch.is_tensor(value) and value.shape[:2] == (rows, width) else value
        for key, value in inputs.items()
    }
    used = int(part["attention_mask"].any(dim=0).nonzero().max()) + 1
    if used < width:
        part = {key: _columns(value, width, used) for key, value in part.items()}
    return part


def _columns(value: Any, width: int, used: int) -> Any:
    """The first ``used`` columns of a (rows, width) tensor; anything else as it is."""
    return value[:, :used] if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == width else value

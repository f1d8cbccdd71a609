"""Which examples share a batch: alike prompts together, so a batch's shared prefix is as long as it can be.

Records whose conversation begins the same way up to the first line of the user turn (the
template's fixed text: every tweet record, say) form a group; a group's examples fill whole batches;
what is left of each group, and the records whose first line is their own (most instructions, which
share only the system turn), are batched together. Within a group, batches hold examples of similar
length. Batch order is shuffled, so training still sees groups interleaved.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import Sampler

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

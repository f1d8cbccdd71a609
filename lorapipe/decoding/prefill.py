"""Prefill: the prompts' shared prefix computed once, then length-sorted batches in passes of little padding,
merged into one decoding state; past a sliding window, one unpadded prompt at a time."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorapipe.decoding import cache_edits
from lorapipe.decoding.prompts import common_prefix_length
from lorapipe.host import release_free_memory, watch_cores

log = logging.getLogger(__name__)


PASS_SLACK = 0.25  # a prefill pass runs at most 25 % padding


# Freed memory the allocator may hold between batches before it goes back to the system: trimming after every batch
# faulted every page in afresh, keeping every freed block took a stage over 3 GiB (docs/evaluation-cost.md).
FREE_HELD = 512 * 2**20


@dataclass(frozen=True)
class State:
    """What greedy decoding continues from: the KV cache, the attention mask so far and each row's next position."""

    cache: Any
    mask: torch.Tensor
    next_position: torch.Tensor


class Prefix:
    """The KV cache of the tokens every prompt starts with, computed once and copied per batch."""

    def __init__(self, model, ids: Sequence[int]):
        self.length = len(ids)
        self.cache = None
        if ids:
            inputs = torch.tensor([list(ids)], device=model.device)
            self.cache = model(input_ids=inputs, attention_mask=torch.ones_like(inputs), use_cache=True).past_key_values

    def for_batch(self, size: int):
        return cache_edits.repeated(self.cache, size) if self.cache is not None else None


@dataclass(frozen=True)
class Fed:
    """Tokens fed after every row's prompt in its prefill, side by side: every label's answer tokens but the last.
    Each sees the prompt and its own label's earlier tokens only, so one pass gives every label's likelihood."""

    tokens: list[int]
    label_of: list[int]  # the label each token belongs to
    offset: list[int]  # its place in that label's tokens

    @classmethod
    def of(cls, answers: dict[str, list[int]]) -> Fed:
        fed = [tokens[:-1] for tokens in answers.values()]
        return cls(
            [token for tokens in fed for token in tokens],
            [i for i, tokens in enumerate(fed) for _ in tokens],
            [j for tokens in fed for j in range(len(tokens))],
        )

    def sees_own(self) -> torch.Tensor:
        """(fed, fed): which fed tokens each fed token attends to."""
        label_of, offset = torch.tensor(self.label_of), torch.tensor(self.offset)
        return (label_of[:, None] == label_of[None, :]) & (offset[:, None] >= offset[None, :])


@dataclass
class Batch:
    """A prefilled batch: the rows' indices in the input, their tokens after the prefix, next-token logits, the
    logits after each fed token (rows x fed x vocabulary; None if nothing was fed), state.

    The state is handed over (:meth:`take_state`) rather than read: decoding moves its cache into a cache of its
    own, and the prefill's tensors can be freed only where nothing else still holds them.
    """

    rows: list[int]
    prefix: Prefix
    suffixes: list[list[int]]
    logits: torch.Tensor
    fed_logits: torch.Tensor | None
    state: State | None
    alone: bool = False  # its state cannot be merged with others' (a sliding window's cache, :func:`_plain_batch`)

    def take_state(self) -> State:
        """The decoding state, which this batch no longer holds."""
        state, self.state = self.state, None
        if state is None:
            raise RuntimeError("a batch's decoding state was taken twice")
        return state


def _fed_mask(model, real: torch.Tensor, prefix_length: int, fed: Fed) -> torch.Tensor:
    """The additive 4D mask of ``[pad | suffix | fed]`` queries over ``[prefix | pad | suffix | fed]`` keys: the
    prompt causal over its real tokens, each fed token over the whole prompt and its own label's tokens."""
    rows, width, fed_count = real.shape[0], real.shape[1] - prefix_length, len(fed.tokens)
    causal = torch.ones((width, prefix_length + width), dtype=torch.bool).tril(diagonal=prefix_length)
    prompt = torch.cat([causal[None] & real[:, None], real.new_zeros((rows, width, fed_count))], dim=2)
    fed_rows = torch.cat([real[:, None].expand(-1, fed_count, -1), fed.sees_own().expand(rows, -1, -1)], dim=2)
    sees = torch.cat([prompt, fed_rows], dim=1).to(model.device)
    return torch.zeros(sees.shape, dtype=model.dtype, device=model.device).masked_fill_(
        ~sees, torch.finfo(model.dtype).min
    )[:, None]


def _prefill_pass(
    model, prefix: Prefix, suffixes: Sequence[Sequence[int]], pad_id: int, fed: Fed | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, State]:
    """Run ``[prefix | pad | suffix]`` rows (then ``fed``'s tokens, side by side); return each row's next-token
    logits, the logits after each fed token, and the decoding state (without the fed tokens)."""
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for row, suffix in enumerate(suffixes):
        ids[row, width - len(suffix) :] = torch.tensor(suffix)
        suffix_mask[row, width - len(suffix) :] = 1
    # Positions count real tokens only, as if unpadded; a pad's position is irrelevant as no token attends to it.
    positions = (prefix.length + suffix_mask.cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([torch.ones((len(suffixes), prefix.length), dtype=torch.long), suffix_mask], dim=1)
    next_position = positions[:, -1] + 1
    attention, fed_count = mask, 0
    if fed is not None:
        fed_count = len(fed.tokens)
        ids = torch.cat([ids, torch.tensor(fed.tokens).expand(len(suffixes), -1)], dim=1)
        positions = torch.cat([positions, next_position[:, None] + torch.tensor(fed.offset)], dim=1)
        attention = _fed_mask(model, mask.bool(), prefix.length, fed)
    out = model(
        input_ids=ids.to(model.device),
        attention_mask=attention.to(model.device),
        position_ids=positions.to(model.device),
        past_key_values=prefix.for_batch(len(suffixes)),
        use_cache=True,
        logits_to_keep=fed_count + 1,
    )
    cache = cache_edits.drop_last(out.past_key_values, fed_count) if fed_count else out.past_key_values
    state = State(cache, mask.to(model.device), next_position.to(model.device))
    return out.logits[:, 0], out.logits[:, 1:] if fed_count else None, state


def prefill_passes(lengths: Sequence[int], slack: float = PASS_SLACK) -> list[range]:
    """Ascending ``lengths`` cut into consecutive passes whose padded tokens are at most ``1 + slack`` times
    their real ones, each as large as that allows (built from the longest row down)."""
    passes, end = [], len(lengths)
    while end > 0:
        start, real = end - 1, lengths[end - 1]
        while start > 0 and (end - start + 1) * lengths[end - 1] <= (1 + slack) * (real + lengths[start - 1]):
            start -= 1
            real += lengths[start]
        passes.append(range(start, end))
        end = start
    return passes[::-1]


def _widened(tensor: torch.Tensor, at: int, pads: int, dim: int) -> torch.Tensor:
    """``tensor`` with ``pads`` zeros inserted before index ``at`` of ``dim``."""
    if pads == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = pads
    head, tail = tensor.narrow(dim, 0, at), tensor.narrow(dim, at, tensor.shape[dim] - at)
    return torch.cat([head, tensor.new_zeros(shape), tail], dim=dim)


def merged(states: list[State], prefix_length: int) -> State:
    """One decoding state for the rows of several states, in order, each padded after the shared prefix (masked
    keys and values of zeros) to the widest one's length. Consumes ``states``: each layer's old tensors are let
    go as soon as that layer is merged, so the merge holds one copy of the cache, not two."""
    if len(states) == 1:
        return states[0]
    width = max(state.mask.shape[1] for state in states)
    pads = [width - state.mask.shape[1] for state in states]

    def widened(tensors: Iterable[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat([_widened(t, prefix_length, n, dim) for t, n in zip(tensors, pads, strict=True)])

    cache = cache_edits.merged([state.cache for state in states], widened)
    mask = widened((state.mask for state in states), 1)
    return State(cache, mask, torch.cat([state.next_position for state in states]))


def prefill_batch(
    model, prefix: Prefix, suffixes: Sequence[Sequence[int]], pad_id: int, fed: Fed | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, State]:
    """Rows of ascending length prefilled in passes of little padding (:func:`prefill_passes`), merged into one
    decoding state: a batch of short instructions and a long one no longer runs every row at the long one's
    length. Returns each row's next-token logits, the logits after each fed token, and the state."""
    results = [
        _prefill_pass(model, prefix, suffixes[rows.start : rows.stop], pad_id, fed)
        for rows in prefill_passes([len(s) for s in suffixes])
    ]
    logits = torch.cat([logits for logits, _, _ in results])
    fed_logits = None if fed is None else torch.cat([fed_logits for _, fed_logits, _ in results])
    return logits, fed_logits, merged([state for _, _, state in results], prefix.length)


def prefilled_batches(
    model, ids: list[list[int]], batch_size: int, pad_id: int, share_prefix: bool, what: str, fed: Fed | None = None
) -> Iterator[Batch]:
    """Length-sorted batches, prefilled after the shared prefix (then ``fed``); logs examples/s as the caller
    consumes them."""
    prefix = Prefix(model, ids[0][: common_prefix_length(ids)] if share_prefix else [])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    started, done = time.perf_counter(), 0
    log.info("%s: %d prompts, %d shared prefix tokens, batches of %d", what, len(ids), prefix.length, batch_size)
    for start in range(0, len(order), batch_size):
        watch_cores()
        release_free_memory(above=FREE_HELD)
        rows = order[start : start + batch_size]
        suffixes = [ids[i][prefix.length :] for i in rows]
        # Built in the yield, not held in a local: this generator's frame must not keep the state alive.
        yield Batch(rows, prefix, suffixes, *prefill_batch(model, prefix, suffixes, pad_id, fed))
        done += len(rows)
        log.info("%s: %d/%d (%.1f examples/s)", what, done, len(ids), done / (time.perf_counter() - started))


def past_window(model, ids: Sequence[Sequence[int]], extra: int, what: str) -> bool:
    """Whether a row of ``ids`` with ``extra`` more tokens reaches the model's sliding window (logged once).

    The shared-prefix batches put padding and fed label tokens among a row's columns and pass a mask of their own,
    which a sliding-window layer counts and slides over as if they were the row's tokens: within the window that
    changes nothing, past it the row attends to the wrong tokens. Such rows go one at a time, as transformers runs
    them, instead.
    """
    window = cache_edits.sliding_window(model.config)
    if window is None or max(map(len, ids)) + extra < window:
        return False
    log.info("%s: prompts reach the model's %d-token sliding window; decoded one at a time, unpadded", what, window)
    return True


def _plain_batch(model, row: int, prompt: Sequence[int]) -> Batch:
    """``prompt`` alone, unpadded, on transformers' own cache and masks: the next-token logits and decoding state."""
    ids = torch.tensor([list(prompt)], device=model.device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    state = State(out.past_key_values, torch.ones_like(ids), torch.tensor([len(prompt)], device=model.device))
    return Batch([row], Prefix(model, []), [list(prompt)], out.logits[:, -1], None, state, alone=True)


def plain_batches(model, ids: list[list[int]], what: str) -> Iterator[Batch]:
    """One batch per prompt (:func:`_plain_batch`), shortest first; logs examples/s as the caller consumes them."""
    started = time.perf_counter()
    for done, row in enumerate(sorted(range(len(ids)), key=lambda i: len(ids[i])), start=1):
        watch_cores()
        release_free_memory(above=FREE_HELD)
        yield _plain_batch(model, row, ids[row])
        log.debug("%s: %d/%d (%.1f examples/s)", what, done, len(ids), done / (time.perf_counter() - started))

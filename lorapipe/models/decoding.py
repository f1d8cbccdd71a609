"""Shared-prefix decoding: label log-likelihoods and greedy answers from one prefill per batch.

All prompts of a test file start with the same tokens (the system turn and the instruction up to
the tweet). Their KV cache is computed once and copied into every batch, so each batch runs only
the part after it. Batches are sorted by length; the rows are padded on the left *after* the
shared prefix (``[prefix | pad | suffix]``) with explicit position ids, so every row ends at the
last column: the next-token logits that score the labels are also the first greedy step, and the
greedy loop continues from the same cache.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from lorapipe.host import refresh_threads, release_free_memory
from lorapipe.labels import LabelSet
from lorapipe.records import Conversation

log = logging.getLogger(__name__)

PASS_SLACK = 0.25  # a prefill pass runs at most 25 % padding
# Open answers to tweets are decoded together once this many wait: a greedy step of 16 rows costs about what one
# of 64 does on a CPU (the weights are read either way), and most of a chatty model's rows end within 2 tokens.
GREEDY_ROWS = 96
# Freed memory the allocator may hold between batches before it goes back to the system: trimming after every
# batch kept base's evaluation at 2.8 GiB but faulted 4.4 million pages in afresh (13 s of system time); keeping
# every freed block (keep_freed_memory, no trim) took eval_all's second adapter to 3,104 MiB (README: Evaluation cost).
FREE_HELD = 512 * 2**20
# Drafted tokens (prompt lookup) are checked only while rows x (1 + drafts) stays within DRAFT_ROWS: below that a step
# costs about the same whatever its rows; 16 decoded the sentiment adapter's answers in 9.5 s, 32 in 10.1, none 12.7.
DRAFT_ROWS = 16
MAX_DRAFT = 8
DRAFT_NGRAM = 3


@dataclass(frozen=True)
class SentimentPrediction:
    """One tweet's result both ways: label log-likelihoods and a parsed greedy answer."""

    logprobs: dict[str, float]
    score_label: str
    answer: str
    generated_label: str | None  # the first label the answer names
    truncated: bool = False
    labels_named: int = 0  # how many of the labels the answer names (more than one: it names several)


@dataclass(frozen=True)
class Generated:
    texts: list[str]
    new_tokens: int
    truncated: int = 0  # prompts cut to max_prompt_tokens


@dataclass(frozen=True)
class _State:
    """What greedy decoding continues from: the KV cache, the attention mask so far and each row's next position."""

    cache: Any
    mask: torch.Tensor
    next_position: torch.Tensor


def render(tokenizer, conversations: Sequence[Conversation]) -> list[str]:
    """Each conversation rendered by the chat template, ending with the assistant header."""
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    # The chat template writes the BOS token (lorapipe.models.loading.chat_template_with_bos makes sure it does).
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def fit_prompts(ids: list[list[int]], max_tokens: int | None) -> tuple[list[list[int]], list[bool]]:
    """Prompts longer than ``max_tokens`` cut in the middle: the opening every prompt shares (system turn and
    instruction) and the end (the rest of the user turn and the assistant header, where the answer starts) stay.

    Each row's flag says whether it was cut. A pasted article or a spam row of 100,000 characters would otherwise
    run for minutes at many GiB, or past the model's context.
    """
    if max_tokens is None or all(len(row) <= max_tokens for row in ids):
        return ids, [False] * len(ids)
    head = min(common_prefix_length(ids), max_tokens // 2)
    fitted = [row if len(row) <= max_tokens else row[:head] + row[len(row) - (max_tokens - head) :] for row in ids]
    return fitted, [len(row) > max_tokens for row in ids]


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens all sequences share, leaving at least one token in each."""
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    length = 0
    while length < limit and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


class Prefix:
    """The KV cache of the tokens every prompt starts with, computed once and copied per batch."""

    def __init__(self, model, ids: Sequence[int]):
        self.length = len(ids)
        self.cache = None
        if ids:
            inputs = torch.tensor([list(ids)], device=model.device)
            self.cache = model(input_ids=inputs, attention_mask=torch.ones_like(inputs), use_cache=True).past_key_values

    def for_batch(self, size: int):
        return repeated(self.cache, size) if self.cache is not None else None


def repeated(cache, times: int):
    """A new cache with each row of ``cache`` repeated ``times`` times; ``cache`` itself is left as it is."""
    clone = shallow_copy(cache)
    clone.batch_repeat_interleave(times)
    return clone


def shallow_copy(cache):
    """A cache that a forward can extend while ``cache`` stays as it is: a shallow copy of it and its layers is
    enough, as every update puts new tensors in the copy's layers rather than writing into the old ones."""
    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers]
    return clone


@dataclass(frozen=True)
class _Fed:
    """Tokens fed after every row's prompt in its prefill, side by side: every label's answer tokens but the last.
    Each sees the prompt and its own label's earlier tokens only, so one pass gives every label's likelihood."""

    tokens: list[int]
    label_of: list[int]  # the label each token belongs to
    offset: list[int]  # its place in that label's tokens

    @classmethod
    def of(cls, answers: dict[str, list[int]]) -> _Fed:
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


@dataclass(frozen=True)
class _Batch:
    """A prefilled batch: the rows' indices in the input, their tokens after the prefix, next-token logits, the
    logits after each fed token (rows x fed x vocabulary; None if nothing was fed), state."""

    rows: list[int]
    prefix: Prefix
    suffixes: list[list[int]]
    logits: torch.Tensor
    fed_logits: torch.Tensor | None
    state: _State


def _fed_mask(model, real: torch.Tensor, prefix_length: int, fed: _Fed) -> torch.Tensor:
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


def _without_fed(cache, fed_count: int):
    """``cache`` with its last ``fed_count`` tokens (the fed ones, which greedy decoding must not see) cut off."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :-fed_count], layer.values[:, :, :-fed_count]
        if hasattr(layer, "cumulative_length"):  # a sliding-window layer (Mistral) sizes its masks by it
            layer.cumulative_length -= fed_count
    return cache


def _prefill_pass(
    model, prefix: Prefix, suffixes: Sequence[Sequence[int]], pad_id: int, fed: _Fed | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, _State]:
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
    cache = _without_fed(out.past_key_values, fed_count) if fed_count else out.past_key_values
    state = _State(cache, mask.to(model.device), next_position.to(model.device))
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


def _merged(states: list[_State], prefix_length: int) -> _State:
    """One decoding state for the rows of several states, in order, each padded after the shared prefix (masked
    keys and values of zeros) to the widest one's length. Consumes ``states``: each layer's old tensors are let
    go as soon as that layer is merged, so the merge holds one copy of the cache, not two."""
    if len(states) == 1:
        return states[0]
    width = max(state.mask.shape[1] for state in states)
    pads = [width - state.mask.shape[1] for state in states]

    def widened(tensors: Iterable[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat([_widened(t, prefix_length, n, dim) for t, n in zip(tensors, pads, strict=True)])

    cache = states[0].cache
    for layer, *parts in zip(cache.layers, *(state.cache.layers for state in states), strict=True):
        layer.keys, layer.values = widened((p.keys for p in parts), 2), widened((p.values for p in parts), 2)
        if hasattr(layer, "cumulative_length"):  # a sliding-window layer (Mistral) sizes its masks by it
            layer.cumulative_length = width
        for part in parts[1:]:
            part.keys = part.values = None
    mask = widened((state.mask for state in states), 1)
    return _State(cache, mask, torch.cat([state.next_position for state in states]))


def _prefill(
    model, prefix: Prefix, suffixes: Sequence[Sequence[int]], pad_id: int, fed: _Fed | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, _State]:
    """Rows of ascending length prefilled in passes of little padding (:func:`prefill_passes`), merged into one
    decoding state: a batch of short instructions and a long one no longer runs every row at the long one's
    length. Returns each row's next-token logits, the logits after each fed token, and the state."""
    results = [
        _prefill_pass(model, prefix, suffixes[rows.start : rows.stop], pad_id, fed)
        for rows in prefill_passes([len(s) for s in suffixes])
    ]
    logits = torch.cat([logits for logits, _, _ in results])
    fed_logits = None if fed is None else torch.cat([fed_logits for _, fed_logits, _ in results])
    return logits, fed_logits, _merged([state for _, _, state in results], prefix.length)


def _prefilled_batches(
    model, ids: list[list[int]], batch_size: int, pad_id: int, share_prefix: bool, what: str, fed: _Fed | None = None
) -> Iterator[_Batch]:
    """Length-sorted batches, prefilled after the shared prefix (then ``fed``); logs examples/s as the caller
    consumes them."""
    prefix = Prefix(model, ids[0][: common_prefix_length(ids)] if share_prefix else [])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    started, done = time.perf_counter(), 0
    log.info("%s: %d prompts, %d shared prefix tokens, batches of %d", what, len(ids), prefix.length, batch_size)
    for start in range(0, len(order), batch_size):
        refresh_threads()
        release_free_memory(above=FREE_HELD)
        rows = order[start : start + batch_size]
        suffixes = [ids[i][prefix.length :] for i in rows]
        logits, fed_logits, state = _prefill(model, prefix, suffixes, pad_id, fed)
        yield _Batch(rows, prefix, suffixes, logits, fed_logits, state)
        done += len(rows)
        log.info("%s: %d/%d (%.1f examples/s)", what, done, len(ids), done / (time.perf_counter() - started))


def stop_ids(model, tokenizer) -> set[int]:
    """The end-of-turn tokens: the generation config's EOS ids and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class _RoomyLayer(DynamicLayer):
    """A cache layer that writes each step's keys and values into room set aside for them.

    ``DynamicLayer`` concatenates the whole cache anew at every step: with 50 rows of 300 tokens that is a fresh
    11 MB tensor per layer, key and value, per token, and on a CPU those copies (and the page faults of their
    allocation) took more time than the model's matrix products. Rows that leave are dropped in place too: the
    rows kept move to the front of the room, which keeps its size (a new room per drop held two caches at once,
    evaluation's memory peak). The tensors the model sees are views of the room, laid out as a room of their own
    rows would be, so its arithmetic is the same.
    """

    @classmethod
    def with_room(cls, layer: DynamicLayer, room: int) -> DynamicLayer:
        """A copy of ``layer`` with room for ``room`` more tokens; a layer of another kind (sliding) as it is."""
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.numel() == 0:
            return layer
        roomy = cls()
        roomy.dtype, roomy.device, roomy.is_initialized = layer.dtype, layer.device, True
        roomy._set(*(cls._spacious(tensor, room) for tensor in (layer.keys, layer.values)), *layer.keys.shape[:3:2])
        return roomy

    @staticmethod
    def _spacious(tensor: torch.Tensor, room: int) -> torch.Tensor:
        rows, heads, length, dim = tensor.shape
        spacious = tensor.new_empty((rows, heads, length + room, dim))
        spacious[:, :, :length] = tensor
        return spacious

    def _set(self, key_room: torch.Tensor, value_room: torch.Tensor, rows: int, length: int) -> None:
        self.key_room, self.value_room = key_room, value_room
        self.keys, self.values = key_room[:rows, :, :length], value_room[:rows, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, length, new = self.keys.shape[0], self.keys.shape[-2], key_states.shape[-2]
        if length + new > self.key_room.shape[-2]:  # out of room: twice as much again
            self._set(*(self._spacious(tensor, length + new) for tensor in (self.keys, self.values)), rows, length)
        self.key_room[:rows, :, length : length + new] = key_states
        self.value_room[:rows, :, length : length + new] = value_states
        self._set(self.key_room, self.value_room, rows, length + new)
        return self.keys, self.values

    def cut(self, length: int) -> None:
        """Forget the keys and values past ``length`` (drafted tokens that greedy decoding rejected)."""
        self._set(self.key_room, self.value_room, self.keys.shape[0], length)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        rows, length = len(indices), self.keys.shape[-2]
        for room in (self.key_room, self.value_room):
            room[:rows, :, :length] = room[indices, :, :length]  # the kept rows, gathered first, then moved
        self._set(self.key_room, self.value_room, rows, length)


def _greedy(
    model,
    logits: torch.Tensor,
    state: _State,
    max_new_tokens: int,
    stops: set[int],
    finished: Callable[[list[int]], bool] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Greedy decoding on from prefilled next-token logits; each row's tokens up to (not including) a stop token.
    Consumes ``state``: its cache's tensors move into the decoding cache.

    A row that stops, or whose tokens ``finished`` accepts, leaves the batch (and the cache), so long answers
    do not drag finished ones along. Given each row's ``prompts``, a step of few rows also checks drafted tokens
    (:class:`_Drafts`): each row keeps those that greedy decoding picks, so the answers are greedy's.
    """
    cache, mask, position = shallow_copy(state.cache), state.mask, state.next_position
    room = max_new_tokens + (MAX_DRAFT if prompts is not None else 0)
    for i, layer in enumerate(cache.layers):  # one layer at a time, letting the old go: one copy of the cache
        cache.layers[i] = _RoomyLayer.with_room(layer, room)
        if cache.layers[i] is not layer:
            layer.keys = layer.values = None
    # Rejected drafts are cut from the cache again, which a room can do (a sliding-window layer cannot).
    roomy = all(isinstance(layer, _RoomyLayer) for layer in cache.layers)
    drafts = [_Drafts(prompt) for prompt in prompts] if prompts is not None and roomy else None
    live = list(range(logits.shape[0]))
    tokens: list[list[int]] = [[] for _ in live]
    decided = [[token] for token in logits.argmax(-1).tolist()]  # each live row's tokens not yet appended
    while True:
        going = [
            _append(tokens[row], new, stops, max_new_tokens, finished) for row, new in zip(live, decided, strict=True)
        ]
        if not any(going):
            break
        if not all(going):
            keep = torch.tensor([j for j, on in enumerate(going) if on], device=logits.device)
            cache.batch_select_indices(keep)
            mask, position = mask[keep], position[keep]
            live = [row for row, on in zip(live, going, strict=True) if on]
        width = min(MAX_DRAFT, DRAFT_ROWS // len(live) - 1) if drafts is not None else 0
        offered = [drafts[row].after(tokens[row], width) if width > 0 else [] for row in live]
        width = max(map(len, offered))  # a row with fewer drafts is filled with its last token
        fed = torch.tensor(
            [
                [tokens[row][-1], *(draft + [tokens[row][-1]] * width)[:width]]
                for row, draft in zip(live, offered, strict=True)
            ],
            device=logits.device,
        )
        length = cache.get_seq_length()
        out = model(
            input_ids=fed,
            attention_mask=torch.cat([mask, mask.new_ones((len(live), width + 1))], dim=1),
            position_ids=position[:, None] + torch.arange(width + 1, device=position.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=width + 1,
        )
        cache, chosen = out.past_key_values, out.logits.argmax(-1)  # greedy's token after each fed one
        accepted = (fed[:, 1:] == chosen[:, :-1]).long().cumprod(1).sum(1)  # leading drafts greedy picks
        kept = int(accepted.max()) + 1
        if kept < width + 1:
            for layer in cache.layers:
                layer.cut(length + kept)
        columns = torch.arange(kept, device=mask.device)
        mask = torch.cat([mask, (columns[None, :] <= accepted[:, None]).to(mask.dtype)], dim=1)
        position = position + accepted + 1
        decided = [[*fed[j, 1 : 1 + n].tolist(), int(chosen[j, n])] for j, n in enumerate(accepted.tolist())]
    return [row[:-1] if row[-1] in stops else row for row in tokens]


def _append(
    answer: list[int],
    new: list[int],
    stops: set[int],
    max_new_tokens: int,
    finished: Callable[[list[int]], bool] | None,
) -> bool:
    """Append ``new`` to ``answer`` one token at a time, up to a stop token, ``max_new_tokens`` or ``finished``;
    whether the answer goes on."""
    for token in new:
        answer.append(token)
        if token in stops or len(answer) >= max_new_tokens or (finished is not None and finished(answer)):
            return False
    return True


class _Drafts:
    """Prompt-lookup drafts for one answer: the tokens that followed the latest earlier occurrence of its last
    one to three tokens, in its prompt or in the answer so far.

    A decoding step of a few rows reads every weight for little arithmetic, so checking a few drafted tokens per
    row costs about what one token does. Small models often repeat themselves or their prompt: the SmolLM2
    sentiment adapter's 50 answers took 60 steps instead of 128 and 9.5 s instead of 12.7 (its longest answer
    repeats one sentence), with the same answers (README: Evaluation cost).
    """

    def __init__(self, prompt: Sequence[int]):
        self.tokens: list[int] = []
        self.prompt_length = len(prompt)
        self.follower: dict[tuple[int, ...], int] = {}  # n-gram -> where the token after its latest occurrence is
        self._extend(prompt)

    def _extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            end = len(self.tokens)
            for n in range(1, DRAFT_NGRAM + 1):
                if end >= n:
                    self.follower[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def after(self, answer: list[int], width: int) -> list[int]:
        """Up to ``width`` tokens drafted to follow ``answer`` (the whole answer so far); [] if none."""
        self._extend(answer[len(self.tokens) - self.prompt_length :])
        for n in range(DRAFT_NGRAM, 0, -1):
            start = self.follower.get(tuple(self.tokens[-n:])) if len(self.tokens) >= n else None
            if start is not None:
                return self.tokens[start : start + width]
        return []


def answer_ids(tokenizer, conversation: Conversation, label: str, stops: set[int]) -> list[int]:
    """The tokens of ``label`` as the whole answer to ``conversation``, up to and including the end-of-turn token,
    as the chat template renders it and training tokenises it."""
    prompt = render(tokenizer, [conversation])[0]
    full = tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": label}], tokenize=False)
    prompt_ids, full_ids = encode(tokenizer, [prompt, full])
    tail = full_ids[len(prompt_ids) :] if full_ids[: len(prompt_ids)] == prompt_ids else []
    end = next((i for i, token in enumerate(tail) if token in stops), None)
    if not end:  # a template that renders the prompt otherwise once answered, or ends no turn: the label, then EOS
        without = encode(tokenizer, [prompt + label])[0]
        tail = without[len(prompt_ids) :] if without[: len(prompt_ids)] == prompt_ids else encode(tokenizer, [label])[0]
        return [*tail, tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stops)]
    return tail[: end + 1]


def _label_logprobs(batch: _Batch, answers: dict[str, list[int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Log-likelihood of each label as the whole answer: its tokens and the end-of-turn token after them; and
    each row's greedy next token after each label's first token (rows x labels), which often ends the answer.

    The first token's comes from the next-token logits; the rest from the logits after the label's tokens, fed
    side by side after each row's prompt in the same prefill (:class:`_Fed`). A label of one token is fed too:
    for its end-of-turn token, so that "pos" cannot win over "positive".
    """
    first = torch.log_softmax(batch.logits.float(), dim=-1)
    logprobs = torch.log_softmax(batch.fed_logits.float(), dim=-1)
    device = batch.logits.device
    scores, starts, start = {}, [], 0
    for label, tokens in answers.items():
        rest = torch.tensor(tokens[1:], device=device)
        scores[label] = first[:, tokens[0]] + logprobs[:, start + torch.arange(len(rest), device=device), rest].sum(-1)
        starts.append(start)
        start += len(tokens) - 1
    return scores, batch.fed_logits[:, starts].argmax(-1)


def _answers_on_label_paths(
    batch: _Batch, answers: dict[str, list[int]], after_first: torch.Tensor, stops: set[int]
) -> list[list[int] | None]:
    """The greedy answers that the prefill (with the label tokens fed in it) already decides, None for the others:
    an answer that ends at once, or a label's first token followed by the end of the turn (a trained model's)."""
    firsts = [tokens[0] for tokens in answers.values()]
    decided: list[list[int] | None] = []
    for token, after in zip(batch.logits.argmax(-1).tolist(), after_first.tolist(), strict=True):
        on = firsts.index(token) if token in firsts else None
        decided.append([] if token in stops else [token] if on is not None and after[on] in stops else None)
    return decided


def _rows(logits: torch.Tensor, state: _State, rows: list[int]) -> tuple[torch.Tensor, _State]:
    """The logits and decoding state of ``rows`` only (all of them: as they are)."""
    if len(rows) == len(logits):
        return logits, state
    keep = torch.tensor(rows, device=logits.device)
    cache = shallow_copy(state.cache)
    cache.batch_select_indices(keep)
    return logits[keep], _State(cache, state.mask[keep], state.next_position[keep])


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _label_scored_batches(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    label_set: LabelSet,
    batch_size: int,
    share_prefix: bool,
    max_prompt_tokens: int | None,
) -> tuple[list[bool], set[int], dict[str, list[int]], Iterator[tuple[_Batch, dict[str, torch.Tensor], torch.Tensor]]]:
    """Which prompts were cut, the stop tokens, each label's answer tokens, and the prefilled batches with each
    label's log-likelihood and the greedy token after each label's first token."""
    ids, cut = fit_prompts(encode(tokenizer, render(tokenizer, conversations)), max_prompt_tokens)
    pad_id, stops = _pad_id(tokenizer), stop_ids(model, tokenizer)
    answers = {label: answer_ids(tokenizer, conversations[0], label, stops) for label in label_set.labels}
    batches = _prefilled_batches(model, ids, batch_size, pad_id, share_prefix, "sentiment", _Fed.of(answers))
    return cut, stops, answers, ((batch, *_label_logprobs(batch, answers)) for batch in batches)


@torch.no_grad()
def score_labels(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    labels: Sequence[str],
    batch_size: int,
    share_prefix: bool = True,
    max_prompt_tokens: int | None = None,
) -> list[dict[str, float]]:
    """Each conversation's log-likelihood of every label as its whole answer, without generating.

    ``no_grad`` rather than ``inference_mode``: training calls this between its steps (validation).
    """
    results: list[dict[str, float] | None] = [None] * len(conversations)
    label_set = LabelSet(tuple(labels))
    *_, scored = _label_scored_batches(
        model, tokenizer, conversations, label_set, batch_size, share_prefix, max_prompt_tokens
    )
    for batch, scores, _ in scored:
        for j, row in enumerate(batch.rows):
            results[row] = {label: float(scores[label][j]) for label in label_set.labels}
    return results


@torch.inference_mode()
def predict_sentiment(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    labels: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    share_prefix: bool = True,
    stop_when_settled: bool = True,
    max_prompt_tokens: int | None = None,
) -> list[SentimentPrediction]:
    """Each conversation's label log-likelihoods (argmax = score label) and its greedy answer, from one prefill.

    The answer stops at the end-of-turn token, after ``max_new_tokens``, or (``stop_when_settled``) as soon as its
    first label is settled (:meth:`~lorapipe.labels.LabelSet.is_settled`): the generated label is then the same as
    the full answer's.
    """
    label_set = LabelSet(tuple(labels))
    cut, stops, answers, scored = _label_scored_batches(
        model, tokenizer, conversations, label_set, batch_size, share_prefix, max_prompt_tokens
    )
    settled = lambda tokens: label_set.is_settled(tokenizer.decode(tokens, skip_special_tokens=True))  # noqa: E731
    finished = settled if stop_when_settled else None
    logprobs: dict[int, dict[str, float]] = {}
    tokens: dict[int, list[int]] = {}
    waiting: list[tuple[list[int], torch.Tensor, _State]] = []  # (input rows, logits, state) of open answers

    def decode_waiting(prefix_length: int) -> None:
        rows = [row for waited, _, _ in waiting for row in waited]
        logits, state = torch.cat([w[1] for w in waiting]), _merged([w[2] for w in waiting], prefix_length)
        waiting.clear()
        for row, decoded in zip(rows, _greedy(model, logits, state, max_new_tokens, stops, finished), strict=True):
            tokens[row] = decoded

    for batch, scores, after_first in scored:
        decided = _answers_on_label_paths(batch, answers, after_first, stops)
        for j, row in enumerate(batch.rows):
            logprobs[row] = {label: float(scores[label][j]) for label in label_set.labels}
            if decided[j] is not None:
                tokens[row] = decided[j]
        open_rows = [j for j, answer in enumerate(decided) if answer is None]
        if open_rows:  # decoded on from the prefill, several batches' open answers together
            waiting.append(([batch.rows[j] for j in open_rows], *_rows(batch.logits, batch.state, open_rows)))
        if sum(len(rows) for rows, _, _ in waiting) >= GREEDY_ROWS:
            decode_waiting(batch.prefix.length)
    if waiting:
        decode_waiting(batch.prefix.length)
    results = []
    for row in range(len(conversations)):
        answer = tokenizer.decode(tokens[row], skip_special_tokens=True).strip()
        scored_row = logprobs[row]
        results.append(
            SentimentPrediction(
                scored_row,
                max(scored_row, key=scored_row.get),
                answer,
                label_set.parse(answer),
                cut[row],
                len(label_set.named(answer)),
            )
        )
    return results


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    batch_size: int,
    max_new_tokens: int,
    share_prefix: bool = True,
    what: str = "generation",
    max_prompt_tokens: int | None = None,
) -> Generated:
    """Greedy answers to each conversation, decoded without special tokens."""
    ids, cut = fit_prompts(encode(tokenizer, render(tokenizer, conversations)), max_prompt_tokens)
    pad_id, stops = _pad_id(tokenizer), stop_ids(model, tokenizer)
    texts: list[str] = [""] * len(ids)
    new_tokens = 0
    for batch in _prefilled_batches(model, ids, batch_size, pad_id, share_prefix, what):
        answers = _greedy(model, batch.logits, batch.state, max_new_tokens, stops, prompts=[ids[i] for i in batch.rows])
        for row, answer in zip(batch.rows, answers, strict=True):
            texts[row] = tokenizer.decode(answer, skip_special_tokens=True).strip()
            new_tokens += len(answer)
    return Generated(texts, new_tokens, sum(cut))

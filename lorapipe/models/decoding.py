"""Shared-prefix decoding: label log-likelihoods and greedy answers from one prefill per batch.

All prompts of a test file start with the same tokens (the system turn and the instruction up to
the tweet). Their KV cache is computed once and copied into every batch, so each batch runs only
the part after it. Batches are sorted by length; the rows are padded on the left *after* the
shared prefix (``[prefix | pad | suffix]``) with explicit position ids, so every row ends at the
last column: the next-token logits that score the labels are also the first greedy step, and the
greedy loop continues from the same cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorapipe.host import refresh_threads, release_free_memory
from lorapipe.labels import LabelSet
from lorapipe.models import cache_edits
from lorapipe.records import Conversation

log = logging.getLogger(__name__)
_RoomyLayer = cache_edits.RoomyLayer  # where earlier code and tests knew it

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


def fit_prompts(
    tokenizer, conversations: Sequence[Conversation], max_tokens: int | None
) -> tuple[list[list[int]], list[bool]]:
    """Each conversation's prompt tokens, those longer than ``max_tokens`` cut in the middle; and whether each was.

    A cut prompt keeps its opening (the system turn, the last user turn's header and its content's first line: the
    instruction) and its end (the rest of the user turn and the assistant header, where the answer starts), each
    found in that prompt alone, so a prompt is cut the same way whatever other prompts it is run with. A pasted
    article or a spam row of 100,000 characters would otherwise run for minutes at many GiB, or past the context.
    """
    texts = render(tokenizer, conversations)
    ids = encode(tokenizer, texts)
    if max_tokens is None:
        return ids, [False] * len(ids)
    fitted = [
        row if len(row) <= max_tokens else _cut(tokenizer, conversation, text, row, max_tokens)
        for conversation, text, row in zip(conversations, texts, ids, strict=True)
    ]
    return fitted, [len(row) > max_tokens for row in ids]


def _cut(tokenizer, conversation: Conversation, text: str, row: list[int], max_tokens: int) -> list[int]:
    """``row`` (``text``'s tokens) cut to ``max_tokens``: its head up to the instruction's end, then its end, which
    keeps at least the tokens after the last user turn's content and a quarter of ``max_tokens`` more."""
    head, closing = max_tokens // 2, 0  # a conversation whose text does not hold its content verbatim
    content = next((m["content"] for m in reversed(conversation) if m.get("role") == "user"), "")
    start = text.rfind(content) if content else -1
    if start >= 0:
        instruction_end = start + len(content.split("\n", 1)[0])
        head = _leading_tokens(tokenizer, text[:instruction_end], row)
        closing = len(encode(tokenizer, [text[start + len(content) :]])[0])
    tail_floor = min(max_tokens, closing + max(1, max_tokens // 4))
    head = max(0, min(head, max_tokens - tail_floor))
    return row[:head] + row[len(row) - (max_tokens - head) :]


def _leading_tokens(tokenizer, opening: str, row: list[int]) -> int:
    """How many leading tokens of ``row`` encode ``opening``'s text (a token that runs past its end excluded)."""
    piece = encode(tokenizer, [opening])[0]
    count = 0
    while count < min(len(piece), len(row)) and piece[count] == row[count]:
        count += 1
    return count


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
        return cache_edits.repeated(self.cache, size) if self.cache is not None else None


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


@dataclass
class _Batch:
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
    state: _State | None
    alone: bool = False  # its state cannot be merged with others' (a sliding window's cache, :func:`_plain_batch`)

    def take_state(self) -> _State:
        """The decoding state, which this batch no longer holds."""
        state, self.state = self.state, None
        if state is None:
            raise RuntimeError("a batch's decoding state was taken twice")
        return state


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
    cache = cache_edits.drop_last(out.past_key_values, fed_count) if fed_count else out.past_key_values
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

    cache = cache_edits.merged([state.cache for state in states], widened)
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
        # Built in the yield, not held in a local: this generator's frame must not keep the state alive.
        yield _Batch(rows, prefix, suffixes, *_prefill(model, prefix, suffixes, pad_id, fed))
        done += len(rows)
        log.info("%s: %d/%d (%.1f examples/s)", what, done, len(ids), done / (time.perf_counter() - started))


def _past_window(model, ids: Sequence[Sequence[int]], extra: int, what: str) -> bool:
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


def _plain_batch(model, row: int, prompt: Sequence[int]) -> _Batch:
    """``prompt`` alone, unpadded, on transformers' own cache and masks: the next-token logits and decoding state."""
    ids = torch.tensor([list(prompt)], device=model.device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    state = _State(out.past_key_values, torch.ones_like(ids), torch.tensor([len(prompt)], device=model.device))
    return _Batch([row], Prefix(model, []), [list(prompt)], out.logits[:, -1], None, state, alone=True)


def _plain_batches(model, ids: list[list[int]], what: str) -> Iterator[_Batch]:
    """One batch per prompt (:func:`_plain_batch`), shortest first; logs examples/s as the caller consumes them."""
    started = time.perf_counter()
    for done, row in enumerate(sorted(range(len(ids)), key=lambda i: len(ids[i])), start=1):
        refresh_threads()
        release_free_memory(above=FREE_HELD)
        yield _plain_batch(model, row, ids[row])
        log.debug("%s: %d/%d (%.1f examples/s)", what, done, len(ids), done / (time.perf_counter() - started))


def _plain_label_logprobs(
    model, prompt: Sequence[int], answers: dict[str, list[int]], pad_id: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`_label_logprobs` for one prompt without fed tokens or a shared prefix: each label's tokens after the
    prompt as a row of its own (padded at the end, where no earlier token sees it), in one stock forward."""
    sequences = [[*prompt, *tokens[:-1]] for tokens in answers.values()]
    width = max(map(len, sequences))
    ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in sequences], device=model.device)
    lengths = torch.tensor([len(row) for row in sequences], device=model.device)
    mask = (torch.arange(width, device=model.device)[None] < lengths[:, None]).long()
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, len(prompt) - 1 :].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    scores, after_first = {}, []
    for i, (label, tokens) in enumerate(answers.items()):
        steps = torch.arange(len(tokens), device=model.device)
        scores[label] = logprobs[i, steps, torch.tensor(tokens, device=model.device)].sum()[None]
        after_first.append(int(logits[i, 1].argmax()) if len(tokens) > 1 else -1)  # -1: the label ends at once
    return scores, torch.tensor([after_first], device=model.device)


def stop_ids(model, tokenizer) -> set[int]:
    """The end-of-turn tokens: the generation config's EOS ids and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _greedy(
    model,
    logits: torch.Tensor,
    state: _State,
    max_new_tokens: int,
    stops: set[int],
    prompts: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Greedy decoding on from prefilled next-token logits; each row's tokens up to (not including) a stop token.
    Consumes ``state``: its cache's layers are replaced in place by the decoding cache's, so the prefill's tensors
    are freed as soon as each is moved, if the caller handed the state over rather than keeping a copy of it.

    A row that stops leaves the batch (and the cache), so long answers do not drag finished ones along. Given each
    row's ``prompts``, a step of few rows also checks drafted tokens (:class:`_Drafts`): each row keeps those that
    greedy decoding picks, so the answers are greedy's.
    """
    cache, mask, position = state.cache, state.mask, state.next_position
    del state
    cache_edits.with_room(cache, max_new_tokens + (MAX_DRAFT if prompts is not None else 0))
    # Rejected drafts are cut from the cache again, which a room can do (a sliding-window layer cannot).
    drafts = [_Drafts(prompt) for prompt in prompts] if prompts is not None and cache_edits.can_cut(cache) else None
    live = list(range(logits.shape[0]))
    tokens: list[list[int]] = [[] for _ in live]
    decided = [[token] for token in logits.argmax(-1).tolist()]  # each live row's tokens not yet appended
    while True:
        going = [_append(tokens[row], new, stops, max_new_tokens) for row, new in zip(live, decided, strict=True)]
        if not any(going):
            break
        if not all(going):
            keep = torch.tensor([j for j, on in enumerate(going) if on], device=logits.device)
            cache_edits.select_rows(cache, keep)
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
            cache_edits.cut(cache, length + kept)
        columns = torch.arange(kept, device=mask.device)
        mask = torch.cat([mask, (columns[None, :] <= accepted[:, None]).to(mask.dtype)], dim=1)
        position = position + accepted + 1
        decided = [[*fed[j, 1 : 1 + n].tolist(), int(chosen[j, n])] for j, n in enumerate(accepted.tolist())]
    return [row[:-1] if row[-1] in stops else row for row in tokens]


def _append(answer: list[int], new: list[int], stops: set[int], max_new_tokens: int) -> bool:
    """Append ``new`` to ``answer`` one token at a time, up to a stop token or ``max_new_tokens``; whether the
    answer goes on."""
    for token in new:
        answer.append(token)
        if token in stops or len(answer) >= max_new_tokens:
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
    if end is None:  # a template that renders the prompt otherwise once answered, or ends no turn: the label, then EOS
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
    device = batch.logits.device
    if batch.fed_logits is None:  # every label's answer is a stop token alone: nothing after it to score
        return {label: first[:, tokens[0]] for label, tokens in answers.items()}, torch.full(
            (len(batch.rows), len(answers)), -1, device=device
        )
    logprobs = torch.log_softmax(batch.fed_logits.float(), dim=-1)
    scores, starts, start = {}, [], 0
    for label, tokens in answers.items():
        rest = torch.tensor(tokens[1:], device=device)
        scores[label] = first[:, tokens[0]] + logprobs[:, start + torch.arange(len(rest), device=device), rest].sum(-1)
        starts.append(min(start, logprobs.shape[1] - 1))  # a label of a stop token alone has no fed token
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
    """The logits and decoding state of ``rows`` only (all of them: as they are). Consumes ``state``: its cache
    keeps only those rows, the others' tensors let go."""
    if len(rows) == len(logits):
        return logits, state
    keep = torch.tensor(rows, device=logits.device)
    cache_edits.select_rows(state.cache, keep)
    return logits[keep], _State(state.cache, state.mask[keep], state.next_position[keep])


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
    max_new_tokens: int = 0,
) -> tuple[list[bool], set[int], dict[str, list[int]], Iterator[tuple[_Batch, dict[str, torch.Tensor], torch.Tensor]]]:
    """Which prompts were cut, the stop tokens, each label's answer tokens, and the prefilled batches with each
    label's log-likelihood and the greedy token after each label's first token."""
    ids, cut = fit_prompts(tokenizer, conversations, max_prompt_tokens)
    pad_id, stops = _pad_id(tokenizer), stop_ids(model, tokenizer)
    answers = {label: answer_ids(tokenizer, conversations[0], label, stops) for label in label_set.labels}
    fed = _Fed.of(answers)
    if _past_window(model, ids, len(fed.tokens) + max_new_tokens, "sentiment"):
        plain = _plain_batches(model, ids, "sentiment")
        scored = ((batch, *_plain_label_logprobs(model, batch.suffixes[0], answers, pad_id)) for batch in plain)
        return cut, stops, answers, scored
    batches = _prefilled_batches(model, ids, batch_size, pad_id, share_prefix, "sentiment", fed if fed.tokens else None)
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
    max_prompt_tokens: int | None = None,
) -> list[SentimentPrediction]:
    """Each conversation's label log-likelihoods (argmax = score label) and its whole greedy answer, from one
    prefill: decoded to the end-of-turn token or ``max_new_tokens``, so that the answer kept and the labels it
    names (``labels_named``) are the whole answer's."""
    label_set = LabelSet(tuple(labels))
    cut, stops, answers, scored = _label_scored_batches(
        model, tokenizer, conversations, label_set, batch_size, share_prefix, max_prompt_tokens, max_new_tokens
    )
    logprobs: dict[int, dict[str, float]] = {}
    tokens: dict[int, list[int]] = {}
    waiting: list[tuple[list[int], torch.Tensor, _State]] = []  # (input rows, logits, state) of open answers

    def decode_waiting(prefix_length: int) -> None:
        rows = [row for waited, _, _ in waiting for row in waited]
        logits, states = torch.cat([w[1] for w in waiting]), [w[2] for w in waiting]
        waiting.clear()  # the states are handed over: decoding frees each layer's prefill tensors as it moves them
        decoded = _greedy(model, logits, _merged(states, prefix_length), max_new_tokens, stops)
        for row, answer in zip(rows, decoded, strict=True):
            tokens[row] = answer

    for batch, scores, after_first in scored:
        decided = _answers_on_label_paths(batch, answers, after_first, stops)
        for j, row in enumerate(batch.rows):
            logprobs[row] = {label: float(scores[label][j]) for label in label_set.labels}
            if decided[j] is not None:
                tokens[row] = decided[j]
        open_rows = [j for j, answer in enumerate(decided) if answer is None]
        state = batch.take_state()
        if open_rows:  # decoded on from the prefill, several batches' open answers together
            waiting.append(([batch.rows[j] for j in open_rows], *_rows(batch.logits, state, open_rows)))
        del state  # the rows decided need no cache; the open ones' is in the waiting list alone
        if waiting and (batch.alone or sum(len(rows) for rows, _, _ in waiting) >= GREEDY_ROWS):
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
    ids, cut = fit_prompts(tokenizer, conversations, max_prompt_tokens)
    pad_id, stops = _pad_id(tokenizer), stop_ids(model, tokenizer)
    texts: list[str] = [""] * len(ids)
    new_tokens = 0
    if _past_window(model, ids, max_new_tokens + MAX_DRAFT, what):
        batches = _plain_batches(model, ids, what)
    else:
        batches = _prefilled_batches(model, ids, batch_size, pad_id, share_prefix, what)
    for batch in batches:
        prompts = [ids[i] for i in batch.rows]
        answers = _greedy(model, batch.logits, batch.take_state(), max_new_tokens, stops, prompts=prompts)
        for row, answer in zip(batch.rows, answers, strict=True):
            texts[row] = tokenizer.decode(answer, skip_special_tokens=True).strip()
            new_tokens += len(answer)
    return Generated(texts, new_tokens, sum(cut))

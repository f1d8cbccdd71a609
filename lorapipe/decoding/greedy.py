"""Greedy decoding on from a prefill: rows leave as they finish, steps written into room set aside in the cache."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorapipe.decoding import cache_edits
from lorapipe.decoding.prefill import State, past_window, plain_batches, prefilled_batches
from lorapipe.decoding.prompts import fit_prompts, padding_id, stop_ids
from lorapipe.errors import PipelineError
from lorapipe.host import available_memory_bytes
from lorapipe.records import Conversation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generated:
    texts: list[str]
    new_tokens: int
    truncated: int = 0  # prompts cut to max_prompt_tokens


def decode_greedy(model, logits: torch.Tensor, state: State, max_new_tokens: int, stops: set[int]) -> list[list[int]]:
    """Greedy decoding on from prefilled next-token logits; each row's tokens up to (not including) a stop token.
    Consumes ``state``: its cache's layers are replaced in place by the decoding cache's, so the prefill's tensors
    are freed as soon as each is moved, if the caller handed the state over rather than keeping a copy of it.

    A row that stops leaves the batch (and the cache), so long answers do not drag finished ones along.
    """
    cache, mask, position = state.cache, state.mask, state.next_position
    del state
    cache_edits.with_room(cache, max_new_tokens)
    live = list(range(logits.shape[0]))
    tokens: list[list[int]] = [[] for _ in live]
    chosen = logits.argmax(-1)
    while True:
        going = [
            _append(tokens[row], int(token), stops, max_new_tokens) for row, token in zip(live, chosen, strict=True)
        ]
        if not any(going):
            break
        if not all(going):
            keep = torch.tensor([j for j, on in enumerate(going) if on], device=logits.device)
            cache_edits.select_rows(cache, keep)
            mask, position = mask[keep], position[keep]
            live = [row for row, on in zip(live, going, strict=True) if on]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        out = model(
            input_ids=torch.tensor([[tokens[row][-1]] for row in live], device=logits.device),
            attention_mask=mask,
            position_ids=position[:, None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache, chosen = out.past_key_values, out.logits[:, -1].argmax(-1)
        position = position + 1
    return [row[:-1] if row and row[-1] in stops else row for row in tokens]


def _append(answer: list[int], token: int, stops: set[int], max_new_tokens: int) -> bool:
    """Append ``token`` to ``answer``; whether the answer goes on (no stop token, fewer than ``max_new_tokens``)."""
    answer.append(token)
    return token not in stops and len(answer) < max_new_tokens


def room_bytes(config, rows: int, tokens: int, dtype: torch.dtype) -> int:
    """The key/value cache of ``rows`` rows of ``tokens`` tokens each (what decoding sets aside)."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize * rows * tokens


def check_room(model, ids: list[list[int]], batch_size: int, max_new_tokens: int, what: str) -> None:
    """One line, before any room is set aside, when ``max_new_tokens`` passes the model's context, or the room
    for the longest prompt and its answer passes the memory free on this machine."""
    longest = max(map(len, ids), default=0)
    context = getattr(model.config, "max_position_embeddings", None)
    # Only the answer is held to the context: prompts past it are eval.max_prompt_tokens' business (and rotary
    # positions do run past a small model's nominal context).
    if context and max_new_tokens > context:
        raise PipelineError(
            f"{what}: max_new_tokens {max_new_tokens}: longer than the model's context of {context} tokens "
            f"(max_position_embeddings)"
        )
    need = room_bytes(model.config, min(batch_size, len(ids)), longest + max_new_tokens, model.dtype)
    free = available_memory_bytes()
    if free is not None and need > free:
        raise PipelineError(
            f"{what}: max_new_tokens {max_new_tokens}: decoding sets aside {need / 2**30:.1f} GiB for batches of "
            f"{min(batch_size, len(ids))} (room for every new token), and {free / 2**30:.1f} GiB is free"
        )


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
    check_room(model, ids, batch_size, max_new_tokens, what)
    pad_id, stops = padding_id(tokenizer), stop_ids(model, tokenizer)
    texts: list[str] = [""] * len(ids)
    new_tokens = 0
    if past_window(model, ids, max_new_tokens, what):
        batches = plain_batches(model, ids, what)
    else:
        batches = prefilled_batches(model, ids, batch_size, pad_id, share_prefix, what)
    for batch in batches:
        answers = decode_greedy(model, batch.logits, batch.take_state(), max_new_tokens, stops)
        for row, answer in zip(batch.rows, answers, strict=True):
            texts[row] = tokenizer.decode(answer, skip_special_tokens=True).strip()
            new_tokens += len(answer)
    return Generated(texts, new_tokens, sum(cut))

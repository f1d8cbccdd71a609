"""Prompts as the chat template renders them, cut on their own terms when too long; the stop tokens and each
label's answer tokens."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lorapipe.records import Conversation, render_chat

log = logging.getLogger(__name__)


def render(tokenizer, conversations: Sequence[Conversation]) -> list[str]:
    """Each conversation rendered by the chat template, ending with the assistant header."""
    return [render_chat(tokenizer, c, add_generation_prompt=True) for c in conversations]


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


def stop_ids(model, tokenizer) -> set[int]:
    """The end-of-turn tokens: the generation config's EOS ids and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def answer_ids(tokenizer, conversation: Conversation, label: str, stops: set[int]) -> list[int]:
    """The tokens of ``label`` as the whole answer to ``conversation``, up to and including the end-of-turn token,
    as the chat template renders it and training tokenises it."""
    prompt = render(tokenizer, [conversation])[0]
    full = render_chat(tokenizer, [*conversation, {"role": "assistant", "content": label}])
    prompt_ids, full_ids = encode(tokenizer, [prompt, full])
    tail = full_ids[len(prompt_ids) :] if full_ids[: len(prompt_ids)] == prompt_ids else []
    end = next((i for i, token in enumerate(tail) if token in stops), None)
    if end is None:  # a template that renders the prompt otherwise once answered, or ends no turn: the label, then EOS
        without = encode(tokenizer, [prompt + label])[0]
        tail = without[len(prompt_ids) :] if without[: len(prompt_ids)] == prompt_ids else encode(tokenizer, [label])[0]
        return [*tail, tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stops)]
    return tail[: end + 1]


def padding_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

"""Label scoring: each label's log-likelihood as the whole answer, and (both ways) the whole greedy answer, from one
prefill per batch."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lorapipe.decoding import cache_edits
from lorapipe.decoding.greedy import decode_greedy
from lorapipe.decoding.prefill import Batch, Fed, State, merged, past_window, plain_batches, prefilled_batches
from lorapipe.decoding.prompts import answer_ids, fit_prompts, padding_id, stop_ids
from lorapipe.labels import LabelSet
from lorapipe.records import Conversation

log = logging.getLogger(__name__)


# Open answers to tweets are decoded together once this many wait: a greedy step of a few rows costs about what one
# of many does on a CPU (the weights are read either way), and most of a chatty model's rows end within 2 tokens.
GREEDY_ROWS = 96


@dataclass(frozen=True)
class SentimentPrediction:
    """One tweet's result both ways: label log-likelihoods and a parsed greedy answer."""

    logprobs: dict[str, float]
    score_label: str
    answer: str
    generated_label: str | None  # the first label the answer names
    truncated: bool = False
    labels_named: int = 0  # how many of the labels the answer names (more than one: it names several)


def _label_logprobs(batch: Batch, answers: dict[str, list[int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Log-likelihood of each label as the whole answer: its tokens and the end-of-turn token after them; and
    each row's greedy next token after each label's first token (rows x labels), which often ends the answer.

    The first token's comes from the next-token logits; the rest from the logits after the label's tokens, fed
    side by side after each row's prompt in the same prefill (:class:`Fed`). A label of one token is fed too:
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


def _answers_on_label_paths(
    batch: Batch, answers: dict[str, list[int]], after_first: torch.Tensor, stops: set[int]
) -> list[list[int] | None]:
    """The greedy answers that the prefill (with the label tokens fed in it) already decides, None for the others:
    an answer that ends at once, or a label's first token followed by the end of the turn (a trained model's)."""
    firsts = [tokens[0] for tokens in answers.values()]
    decided: list[list[int] | None] = []
    for token, after in zip(batch.logits.argmax(-1).tolist(), after_first.tolist(), strict=True):
        on = firsts.index(token) if token in firsts else None
        decided.append([] if token in stops else [token] if on is not None and after[on] in stops else None)
    return decided


def _rows(logits: torch.Tensor, state: State, rows: list[int]) -> tuple[torch.Tensor, State]:
    """The logits and decoding state of ``rows`` only (all of them: as they are). Consumes ``state``: its cache
    keeps only those rows, the others' tensors let go."""
    if len(rows) == len(logits):
        return logits, state
    keep = torch.tensor(rows, device=logits.device)
    cache_edits.select_rows(state.cache, keep)
    return logits[keep], State(state.cache, state.mask[keep], state.next_position[keep])


def _label_scored_batches(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    label_set: LabelSet,
    batch_size: int,
    share_prefix: bool,
    max_prompt_tokens: int | None,
    max_new_tokens: int = 0,
) -> tuple[list[bool], set[int], dict[str, list[int]], Iterator[tuple[Batch, dict[str, torch.Tensor], torch.Tensor]]]:
    """Which prompts were cut, the stop tokens, each label's answer tokens, and the prefilled batches with each
    label's log-likelihood and the greedy token after each label's first token."""
    ids, cut = fit_prompts(tokenizer, conversations, max_prompt_tokens)
    pad_id, stops = padding_id(tokenizer), stop_ids(model, tokenizer)
    answers = {label: answer_ids(tokenizer, conversations[0], label, stops) for label in label_set.labels}
    fed = Fed.of(answers)
    if past_window(model, ids, len(fed.tokens) + max_new_tokens, "sentiment"):
        plain = plain_batches(model, ids, "sentiment")
        scored = ((batch, *_plain_label_logprobs(model, batch.suffixes[0], answers, pad_id)) for batch in plain)
        return cut, stops, answers, scored
    batches = prefilled_batches(model, ids, batch_size, pad_id, share_prefix, "sentiment", fed if fed.tokens else None)
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
    waiting: list[tuple[list[int], torch.Tensor, State]] = []  # (input rows, logits, state) of open answers

    def decode_waiting(prefix_length: int) -> None:
        rows = [row for waited, _, _ in waiting for row in waited]
        logits, states = torch.cat([w[1] for w in waiting]), [w[2] for w in waiting]
        waiting.clear()  # the states are handed over: decoding frees each layer's prefill tensors as it moves them
        decoded = decode_greedy(model, logits, merged(states, prefix_length), max_new_tokens, stops)
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

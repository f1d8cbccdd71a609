"""Evaluation of one causal LM: sentiment by label scoring and by greedy answers, and instruction answers.

All prompts of a test file start with the same tokens (the system turn and the instruction up
to the tweet). Their KV cache is computed once and copied into every batch, so each batch runs
only the part after it. Batches are sorted by length; the rows are padded on the left *after*
the shared prefix (``[prefix | pad | suffix]``) with explicit position ids, so every row ends at
the last column: the next-token logits that score the labels are also the first greedy step,
and the greedy loop continues from the same cache.
"""

from __future__ import annotations

import copy
import csv
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from lorapipe.baseline import tfidf_predictions
from lorapipe.config import SENTIMENT_LABELS, EvalParams
from lorapipe.errors import PipelineError
from lorapipe.io import atomic_dir, atomic_file, read_jsonl, write_json, write_jsonl
from lorapipe.metrics import NO_LABEL, classification_metrics, mean_scores, parse_label, text_scores

log = logging.getLogger(__name__)

T = TypeVar("T")
Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class SentimentPrediction:
    """One tweet's result both ways: label log-likelihoods and a parsed greedy answer."""

    logprobs: dict[str, float]
    score_label: str
    answer: str
    generated_label: str | None


@dataclass(frozen=True)
class Generated:
    texts: list[str]
    new_tokens: int


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
    # The chat template writes any BOS token itself.
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


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
        if self.cache is None:
            return None
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(size)
        return cache


@dataclass(frozen=True)
class _Batch:
    """A prefilled batch: the rows' indices in the input, their tokens after the prefix, next-token logits, state."""

    rows: list[int]
    prefix: Prefix
    suffixes: list[list[int]]
    logits: torch.Tensor
    state: _State


def _prefill(
    model, prefix: Prefix, suffixes: Sequence[Sequence[int]], pad_id: int, keep: int = 1
) -> tuple[torch.Tensor, _State]:
    """Run ``[prefix | pad | suffix]`` rows; return the logits of the last ``keep`` columns and the decoding state."""
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for row, suffix in enumerate(suffixes):
        ids[row, width - len(suffix) :] = torch.tensor(suffix)
        suffix_mask[row, width - len(suffix) :] = 1
    # Positions count real tokens only, as if unpadded; a pad's position is irrelevant as no token attends to it.
    positions = (prefix.length + suffix_mask.cumsum(-1) - 1).clamp(min=0).to(model.device)
    mask = torch.cat([torch.ones((len(suffixes), prefix.length), dtype=torch.long), suffix_mask], dim=1)
    ids, mask = ids.to(model.device), mask.to(model.device)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=prefix.for_batch(len(suffixes)),
        use_cache=True,
        logits_to_keep=keep,
    )
    return out.logits, _State(out.past_key_values, mask, positions[:, -1] + 1)


def _prefilled_batches(
    model, ids: list[list[int]], batch_size: int, pad_id: int, share_prefix: bool, what: str
) -> Iterator[_Batch]:
    """Length-sorted batches, prefilled after the shared prefix; logs examples/s as the caller consumes them."""
    prefix = Prefix(model, ids[0][: common_prefix_length(ids)] if share_prefix else [])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    started, done = time.perf_counter(), 0
    log.info("%s: %d prompts, %d shared prefix tokens, batches of %d", what, len(ids), prefix.length, batch_size)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        suffixes = [ids[i][prefix.length :] for i in rows]
        logits, state = _prefill(model, prefix, suffixes, pad_id)
        yield _Batch(rows, prefix, suffixes, logits[:, -1], state)
        done += len(rows)
        log.info("%s: %d/%d (%.1f examples/s)", what, done, len(ids), done / (time.perf_counter() - started))


def stop_ids(model, tokenizer) -> set[int]:
    """The end-of-turn tokens: the generation config's EOS ids and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _greedy(model, logits: torch.Tensor, state: _State, max_new_tokens: int, stops: set[int]) -> list[list[int]]:
    """Greedy decoding on from prefilled next-token logits; each row's tokens up to (not including) a stop token.

    A row that stops leaves the batch (and the cache), so long answers do not drag finished ones along.
    """
    stop = torch.tensor(sorted(stops), device=logits.device)
    cache, mask, position = state.cache, state.mask, state.next_position
    live = list(range(logits.shape[0]))
    tokens: list[list[int]] = [[] for _ in live]
    token = logits.argmax(-1)
    for step in range(max_new_tokens):
        for row, value in zip(live, token.tolist(), strict=True):
            tokens[row].append(value)
        going = ~torch.isin(token, stop)
        if not going.any() or step + 1 == max_new_tokens:
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            mask, position, token = mask[keep], position[keep], token[keep]
            live = [live[i] for i in keep.tolist()]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position[:, None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache, position, token = out.past_key_values, position + 1, out.logits[:, -1].argmax(-1)
    return [row[:-1] if row[-1] in stops else row for row in tokens]


def label_token_ids(tokenizer, prompt: str, label: str) -> list[int]:
    """The tokens of ``label`` as an answer right after a rendered prompt, as training tokenizes it."""
    prompt_ids, full = encode(tokenizer, [prompt, prompt + label])
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids) :]
    return encode(tokenizer, [label])[0]


def _label_logprobs(model, batch: _Batch, label_ids: dict[str, list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Sum of log-probabilities of each label's tokens; one extra teacher-forced pass per multi-token label."""
    first = torch.log_softmax(batch.logits.float(), dim=-1)
    scores = {}
    for label, tokens in label_ids.items():
        if len(tokens) == 1:
            scores[label] = first[:, tokens[0]]
            continue
        logits, _ = _prefill(model, batch.prefix, [s + tokens[:-1] for s in batch.suffixes], pad_id, keep=len(tokens))
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        scores[label] = logprobs[:, torch.arange(len(tokens)), torch.tensor(tokens)].sum(-1)
    return scores


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.inference_mode()
def evaluate_sentiment(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    batch_size: int,
    max_new_tokens: int,
    labels: Sequence[str] = SENTIMENT_LABELS,
    share_prefix: bool = True,
) -> list[SentimentPrediction]:
    """Each conversation's label log-likelihoods (argmax = score label) and its greedy answer, from one prefill."""
    texts = render(tokenizer, conversations)
    ids = encode(tokenizer, texts)
    label_ids = {label: label_token_ids(tokenizer, texts[0], label) for label in labels}
    pad_id, stops = _pad_id(tokenizer), stop_ids(model, tokenizer)
    results: list[SentimentPrediction | None] = [None] * len(ids)
    for batch in _prefilled_batches(model, ids, batch_size, pad_id, share_prefix, "sentiment"):
        scores = _label_logprobs(model, batch, label_ids, pad_id)
        answers = _greedy(model, batch.logits, batch.state, max_new_tokens, stops)
        for j, row in enumerate(batch.rows):
            logprobs = {label: float(scores[label][j]) for label in labels}
            answer = tokenizer.decode(answers[j], skip_special_tokens=True).strip()
            results[row] = SentimentPrediction(logprobs, max(logprobs, key=logprobs.get), answer, parse_label(answer))
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
) -> Generated:
    """Greedy answers to each conversation, decoded without special tokens."""
    ids = encode(tokenizer, render(tokenizer, conversations))
    pad_id, stops = _pad_id(tokenizer), stop_ids(model, tokenizer)
    texts: list[str] = [""] * len(ids)
    new_tokens = 0
    for batch in _prefilled_batches(model, ids, batch_size, pad_id, share_prefix, what):
        answers = _greedy(model, batch.logits, batch.state, max_new_tokens, stops)
        for row, answer in zip(batch.rows, answers, strict=True):
            texts[row] = tokenizer.decode(answer, skip_special_tokens=True).strip()
            new_tokens += len(answer)
    return Generated(texts, new_tokens)


# --- test files in, metrics and predictions out ---------------------------------------------------------------


@dataclass(frozen=True)
class EvalData:
    """The evaluation inputs, validated: held-out tweets, held-out instructions, out-of-sample instructions."""

    sentiment: list[dict[str, Any]]
    instructions: list[dict[str, Any]]
    out_of_sample: list[dict[str, Any]]


@dataclass(frozen=True)
class Outputs:
    """What one evaluation writes: its metrics and its prediction files (name -> rows)."""

    metrics: dict[str, Any]
    files: dict[str, list[dict[str, Any]]]


def _conversation(value: Any, path: Path, number: int) -> Conversation:
    if not (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    ):
        raise PipelineError(f"{path}: record {number} field 'prompt' is not a list of {{role, content}} messages")
    return value


def _text(row: dict[str, Any], field: str, path: Path, number: int) -> str:
    if not isinstance(row.get(field), str):
        raise PipelineError(f"{path}: record {number} field {field!r} is not text")
    return row[field]


def _nonempty(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    if not rows:
        raise PipelineError(f"{path}: no records")
    return rows


def load_sentiment(path: Path, size: int | None = None) -> list[dict[str, Any]]:
    """The first ``size`` (all if None) held-out tweets as {text, label, prompt}; labels must be known."""
    rows = []
    for number, row in enumerate(_nonempty(read_jsonl(path, ("prompt", "label", "text")), path)[:size], start=1):
        label = _text(row, "label", path, number)
        if label not in SENTIMENT_LABELS:
            raise PipelineError(f"{path}: record {number} field 'label' is {label!r}; known: {list(SENTIMENT_LABELS)}")
        rows.append(
            {
                "text": _text(row, "text", path, number),
                "label": label,
                "prompt": _conversation(row["prompt"], path, number),
            }
        )
    return rows


def load_instructions(path: Path, size: int | None = None) -> list[dict[str, Any]]:
    """The first ``size`` held-out instructions as {instruction, input, reference, prompt}."""
    rows = []
    for number, row in enumerate(
        _nonempty(read_jsonl(path, ("prompt", "completion", "instruction")), path)[:size], start=1
    ):
        completion = row["completion"]
        if not (
            isinstance(completion, list)
            and completion
            and isinstance(completion[-1], dict)
            and isinstance(completion[-1].get("content"), str)
        ):
            raise PipelineError(f"{path}: record {number} field 'completion' holds no assistant message")
        rows.append(
            {
                "instruction": _text(row, "instruction", path, number),
                "input": str(row.get("input") or ""),
                "reference": completion[-1]["content"],
                "prompt": _conversation(row["prompt"], path, number),
            }
        )
    return rows


def load_out_of_sample(path: Path) -> list[dict[str, Any]]:
    """The out-of-sample instructions as {id, instruction, input, prompt} (no reference answers)."""
    return [
        {
            "id": str(row["id"]),
            "instruction": _text(row, "instruction", path, number),
            "input": str(row.get("input") or ""),
            "prompt": _conversation(row["prompt"], path, number),
        }
        for number, row in enumerate(_nonempty(read_jsonl(path, ("id", "instruction", "prompt")), path), start=1)
    ]


def load_eval_data(prepared: Path, params: EvalParams) -> EvalData:
    data = EvalData(
        load_sentiment(prepared / "sentiment_test.jsonl", params.sentiment_size),
        load_instructions(prepared / "instructions_test.jsonl", params.instruction_size),
        load_out_of_sample(prepared / "out_of_sample.jsonl"),
    )
    log.info(
        "read %d tweets, %d instructions, %d out-of-sample instructions from %s",
        len(data.sentiment),
        len(data.instructions),
        len(data.out_of_sample),
        prepared,
    )
    return data


def _confusion_rows(actual: Sequence[str], predicted: Sequence[str | None]) -> list[dict[str, str]]:
    return [{"actual": a, "predicted": p or NO_LABEL} for a, p in zip(actual, predicted, strict=True)]


def _sentiment_scores(actual: Sequence[str], predicted: Sequence[str | None], no_label: bool = True) -> dict:
    scores = classification_metrics(actual, predicted)
    if not no_label:
        del scores["no_label_rate"]
    return scores


def evaluate_baseline(train: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]]) -> Outputs:
    """The TF-IDF + logistic regression baseline on the same held-out tweets."""
    actual = [r["label"] for r in test]
    predicted = tfidf_predictions([r["text"] for r in train], [r["label"] for r in train], [r["text"] for r in test])
    metrics = {
        "sentiment": {"tfidf": _sentiment_scores(actual, predicted, no_label=False)},
        "examples": {"train": len(train), "sentiment": len(test)},
    }
    rows = [{"text": r["text"], "label": r["label"], "predicted": p} for r, p in zip(test, predicted, strict=True)]
    return Outputs(metrics, {"sentiment.jsonl": rows, "confusion.csv": _confusion_rows(actual, predicted)})


def _timed(seconds: dict[str, float], name: str, work: Callable[[], T]) -> T:
    started = time.perf_counter()
    result = work()
    seconds[name] = round(time.perf_counter() - started, 1)
    return result


def evaluate_model(model, tokenizer, data: EvalData, params: EvalParams) -> Outputs:
    """Both sentiment ways, the scored instruction answers and the out-of-sample answers of one model."""
    seconds: dict[str, float] = {}
    generate = partial(
        generate_answers,
        model,
        tokenizer,
        batch_size=params.generation_batch_size,
        max_new_tokens=params.max_new_tokens,
    )
    tweets = [r["prompt"] for r in data.sentiment]
    predictions = _timed(
        seconds,
        "sentiment",
        lambda: evaluate_sentiment(model, tokenizer, tweets, params.batch_size, params.sentiment_max_new_tokens),
    )
    answers = _timed(
        seconds, "instructions", lambda: generate([r["prompt"] for r in data.instructions], what="instructions")
    )
    extra = _timed(
        seconds, "out_of_sample", lambda: generate([r["prompt"] for r in data.out_of_sample], what="out_of_sample")
    )
    references = [r["reference"] for r in data.instructions]
    per_pair = _timed(
        seconds,
        "text_scores",
        lambda: text_scores(answers.texts, references, params.bertscore_model, params.bertscore_num_layers),
    )

    actual = [r["label"] for r in data.sentiment]
    generated = [p.generated_label for p in predictions]
    generation_seconds = max(seconds["instructions"] + seconds["out_of_sample"], 0.1)
    metrics = {
        "sentiment": {
            "generate": _sentiment_scores(actual, generated),
            "score": _sentiment_scores(actual, [p.score_label for p in predictions], no_label=False),
        },
        "instructions": mean_scores(per_pair),
        "examples": {"sentiment": len(actual), "instructions": len(references), "out_of_sample": len(extra.texts)},
        "seconds": seconds,
        "speed": {
            "sentiment_examples_per_second": round(len(actual) / max(seconds["sentiment"], 0.1), 2),
            "generated_tokens_per_second": round((answers.new_tokens + extra.new_tokens) / generation_seconds, 1),
        },
    }
    return Outputs(
        metrics,
        {
            "sentiment.jsonl": [
                {
                    "text": r["text"],
                    "label": r["label"],
                    "answer": p.answer,
                    "generated_label": p.generated_label,
                    "score_label": p.score_label,
                    "logprobs": {k: round(v, 4) for k, v in p.logprobs.items()},
                }
                for r, p in zip(data.sentiment, predictions, strict=True)
            ],
            "confusion.csv": _confusion_rows(actual, generated),
            "instructions.jsonl": [
                {
                    "instruction": r["instruction"],
                    "input": r["input"],
                    "reference": r["reference"],
                    "answer": answer,
                    **{name: round(values[i], 4) for name, values in per_pair.items()},
                }
                for i, (r, answer) in enumerate(zip(data.instructions, answers.texts, strict=True))
            ],
            "out_of_sample.jsonl": [
                {"id": r["id"], "instruction": r["instruction"], "input": r["input"], "answer": answer}
                for r, answer in zip(data.out_of_sample, extra.texts, strict=True)
            ],
        },
    )


def write_outputs(outputs: Outputs, metrics_path: Path, predictions_dir: Path) -> None:
    """Write the predictions folder, then the metrics file, each replacing the old one only when complete."""
    with atomic_dir(predictions_dir) as staging:
        for name, rows in outputs.files.items():
            if name.endswith(".csv"):
                with open(staging / name, "w", newline="", encoding="utf-8") as handle:
                    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
            else:
                write_jsonl(staging / name, rows)
    with atomic_file(metrics_path) as staging:
        write_json(staging, outputs.metrics)
    log.info("wrote %s and %s/ (%s)", metrics_path, predictions_dir, ", ".join(outputs.files))

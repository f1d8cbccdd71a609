"""The prompt/completion record: TRL's conversational format, built and validated here and nowhere else.

A record is one JSON object per line::

    {"prompt": [{"role": "system", "content": ...}, {"role": "user", "content": ...}],
     "completion": [{"role": "assistant", "content": ...}], ...extra text fields}

Training, mix, evaluation and chat read record files through :func:`read_records`, so a malformed line
stops any of them with the same message naming the file, the record and the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lorapipe.errors import PipelineError
from lorapipe.io import read_jsonl

Message = dict[str, str]
Conversation = list[Message]


def record(prompt: Conversation, answer: str, **extra: Any) -> dict[str, Any]:
    """A conversational prompt/completion record (TRL computes the loss on the completion only)."""
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}], **extra}


def _is_conversation(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


def check_record(
    row: dict[str, Any],
    path: Path,
    number: int,
    completion: bool = True,
    text_fields: Iterable[str] = (),
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``row`` itself if it is a valid record; otherwise one error naming the file, the record and the field.

    With ``labels``, a ``label`` text field must be one of them."""

    def bad(field: str, why: str) -> PipelineError:
        return PipelineError(f"{path}: record {number} field {field!r} {why}")

    if not _is_conversation(row.get("prompt")):
        raise bad("prompt", "is not a list of {role, content} messages")
    if completion:
        answer = row.get("completion")
        if not _is_conversation(answer) or answer[-1]["role"] != "assistant":
            raise bad("completion", "is not a list of messages ending with an assistant message")
    for field in text_fields:
        if not isinstance(row.get(field), str):
            raise bad(field, "is missing or not text")
    if labels is not None and "label" in text_fields and row["label"] not in labels:
        raise bad("label", f"is {row['label']!r}; the labels are {list(labels)}")
    return row


def read_records(
    path: str | Path,
    completion: bool = True,
    text_fields: Iterable[str] = (),
    limit: int | None = None,
    labels: Sequence[str] | None = None,
    allow_empty: bool = False,
) -> list[dict[str, Any]]:
    """The first ``limit`` (all if None) records of a JSONL file, each checked; an empty file is an error unless
    ``allow_empty``."""
    path = Path(path)
    fields = tuple(text_fields)
    rows = read_jsonl(path)
    if not rows and not allow_empty:
        raise PipelineError(f"{path}: no records")
    return [check_record(row, path, n, completion, fields, labels) for n, row in enumerate(rows[:limit], start=1)]


def answer_text(row: dict[str, Any]) -> str:
    """The assistant's answer of a checked record."""
    return row["completion"][-1]["content"]


def render_chat(tokenizer, conversation: Conversation, add_generation_prompt: bool = False) -> str:
    """``conversation`` as the tokenizer's chat template renders it; a template that fails (transformers renders
    it in Jinja's sandbox, which stops an escape with a SecurityError) is one line naming it."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as err:
        where = getattr(tokenizer, "name_or_path", "") or "the model"
        raise PipelineError(f"{where}: chat_template: {type(err).__name__}: {err}") from None

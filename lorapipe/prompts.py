"""Chat records: the prompt/completion conversations that training and evaluation share."""

from __future__ import annotations

from typing import Any

from lorapipe.config import PromptParams

Message = dict[str, str]


def sentiment_prompt(text: str, prompt: PromptParams) -> list[Message]:
    return _conversation(prompt.system, prompt.sentiment_template.format(text=text))


def instruction_prompt(instruction: str, input_text: str, prompt: PromptParams) -> list[Message]:
    if input_text.strip():
        user = prompt.instruction_with_input_template.format(instruction=instruction, input=input_text)
    else:
        user = prompt.instruction_template.format(instruction=instruction)
    return _conversation(prompt.system, user)


def _conversation(system: str, user: str) -> list[Message]:
    # An explicit system turn, even an empty one, stops templates (SmolLM2's) adding their own long default.
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def record(prompt_messages: list[Message], answer: str, **extra: Any) -> dict[str, Any]:
    """A TRL conversational prompt/completion record (loss on the completion only)."""
    return {"prompt": prompt_messages, "completion": [{"role": "assistant", "content": answer}], **extra}

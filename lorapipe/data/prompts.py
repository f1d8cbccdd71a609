"""The conversations the models see: a tweet to classify, or an instruction, after the system turn."""

from __future__ import annotations

from collections.abc import Sequence

from lorapipe.config import PromptParams
from lorapipe.labels import describe
from lorapipe.records import Conversation


def sentiment_prompt(text: str, prompt: PromptParams, labels: Sequence[str]) -> Conversation:
    """The conversation for one text to label; the template's ``{labels}`` names them ("a, b or c")."""
    return _conversation(prompt.system, prompt.sentiment_template.format(text=text, labels=describe(labels)))


def instruction_prompt(instruction: str, input_text: str, prompt: PromptParams) -> Conversation:
    if input_text.strip():
        user = prompt.instruction_with_input_template.format(instruction=instruction, input=input_text)
    else:
        user = prompt.instruction_template.format(instruction=instruction)
    return _conversation(prompt.system, user)


def _conversation(system: str, user: str) -> Conversation:
    # An explicit system turn, even an empty one, stops templates (SmolLM2's) adding their own long default.
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]

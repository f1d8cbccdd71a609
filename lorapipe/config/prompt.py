"""``prompt``: the system turn and the user-turn templates of every conversation."""

from __future__ import annotations

from pydantic import field_validator

from lorapipe.config.fields import Section, doc, require_placeholders


class PromptParams(Section):
    system: str = doc("the system turn of every conversation (an explicit one stops templates adding theirs)")
    sentiment_template: str = doc(
        "the user turn for a tweet; {text} is the tweet, {labels} (optional) names data.labels ('a, b or c')"
    )
    instruction_template: str = doc("the user turn for an instruction; {instruction} is the instruction")
    instruction_with_input_template: str = doc("the user turn for an instruction with an input: {instruction}, {input}")

    @field_validator("sentiment_template")
    @classmethod
    def _text(cls, value: str) -> str:
        return require_placeholders(value, {"text"}, frozenset({"labels"}))

    @field_validator("instruction_template")
    @classmethod
    def _instruction(cls, value: str) -> str:
        return require_placeholders(value, {"instruction"})

    @field_validator("instruction_with_input_template")
    @classmethod
    def _instruction_and_input(cls, value: str) -> str:
        return require_placeholders(value, {"instruction", "input"})

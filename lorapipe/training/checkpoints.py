"""Resumable training: which checkpoint to resume from, if any.

Checkpoints exist to resume an interrupted run: a finished run deletes them once its adapter is written
(:func:`remove_checkpoints`), so DVC rerunning the stage always trains. A checkpoint is resumed only if it
was trained from the same inputs (``fingerprint.json``: params, data, base model, the code the stage runs,
the versions of the libraries that do the arithmetic, and the host's choices such as the precision) and was
written completely: Trainer writes ``trainer_state.json`` last, after the weights, the optimizer and
the scheduler, so a run killed mid-save leaves a folder without it (or with files missing), which is
removed with a log line instead of blocking every later run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from lorapipe.code_deps import code_digest
from lorapipe.io import sha256_file

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")
OPTIMIZER = ("optimizer.pt", "optimizer_0", "optimizer.bin")
# The libraries whose upgrade can change a training step's arithmetic, data order or saved state.
ARITHMETIC_LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "trl", "accelerate", "datasets", "bitsandbytes")


def library_versions(names: tuple[str, ...] = ARITHMETIC_LIBRARIES) -> dict[str, str | None]:
    """The installed version of each library (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def fingerprint(
    params: dict[str, Any], train_file: Path, base_model: Path, script: Path, host: dict[str, Any]
) -> dict[str, Any]:
    """What a checkpoint was trained from: the params, the training data, the base model, the code ``script``
    runs, the libraries' versions and the host's choices that change the arithmetic (``host``: precision...)."""
    manifest = base_model / "manifest.json"
    inputs = {
        **params,
        "data": sha256_file(train_file),
        "base": sha256_file(manifest) if manifest.exists() else None,
        "code": code_digest(script),
        "libraries": library_versions(),
        "host": host,
    }
    inputs["digest"] = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return inputs


def changed_inputs(previous: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The names of the inputs that differ between two fingerprints (the digest aside)."""
    keys = (set(previous) | set(expected)) - {"digest"}
    return sorted(key for key in keys if previous.get(key) != expected.get(key))


def is_complete(checkpoint: Path) -> bool:
    """Whether a checkpoint folder holds a readable trainer state, weights, optimizer and scheduler."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        any((checkpoint / name).exists() for name in WEIGHTS)
        and any((checkpoint / name).exists() for name in OPTIMIZER)
        and (checkpoint / "scheduler.pt").exists()
    )


def _by_step(folder: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found)]


def resume_point(checkpoints: Path, expected: dict[str, Any]) -> Path | None:
    """The newest complete checkpoint trained from ``expected``'s inputs, or None; checkpoints of other inputs and
    incomplete ones are deleted (by the main process only: see ``lorapipe.training.recipe.resume_checkpoint``)."""
    if not checkpoints.is_dir():
        return None
    stamp = checkpoints / FINGERPRINT
    try:
        previous = json.loads(stamp.read_text(encoding="utf-8")) if stamp.exists() else None
    except ValueError:
        previous = None
    if previous is None or previous.get("digest") != expected["digest"]:
        if any(checkpoints.iterdir()):
            changed = changed_inputs(previous, expected) if previous is not None else ["unknown inputs"]
            log.info("checkpoints in %s come from other %s: starting over", checkpoints, ", ".join(changed))
            shutil.rmtree(checkpoints)
        return None
    resume = None
    for checkpoint in _by_step(checkpoints):
        if is_complete(checkpoint):
            resume = checkpoint
        else:
            log.warning("removing %s: written only in part (the run was interrupted while saving it)", checkpoint)
            shutil.rmtree(checkpoint)
    return resume


def remove_checkpoints(checkpoints: Path) -> int:
    """Delete what a finished run left in its checkpoints folder (the trainer's checkpoints and model card) but
    the fingerprint, which stays as DVC tracks the folder; how many checkpoints there were."""
    if not checkpoints.is_dir():
        return 0
    count = len(_by_step(checkpoints))
    for path in checkpoints.iterdir():
        if path.name != FINGERPRINT:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return count

"""Resumable training: which checkpoint to resume from, if any.

A checkpoint is resumed only if it was trained from the same inputs (``fingerprint.json``) and was
written completely: Trainer writes ``trainer_state.json`` last, after the weights, the optimizer and
the scheduler, so a run killed mid-save leaves a folder without it (or with files missing), which is
removed with a log line instead of blocking every later run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from lorapipe.io import sha256_file

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")
OPTIMIZER = ("optimizer.pt", "optimizer_0", "optimizer.bin")


def fingerprint(params: dict[str, Any], train_file: Path, base_model: Path) -> dict[str, Any]:
    """What a checkpoint was trained from: the params, the training data and the base model."""
    manifest = base_model / "manifest.json"
    inputs = {
        **params,
        "data": sha256_file(train_file),
        "base": sha256_file(manifest) if manifest.exists() else None,
    }
    inputs["digest"] = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return inputs


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
            log.info("checkpoints in %s come from other params or data: starting over", checkpoints)
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

"""Where one training run reads and writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainJob:
    """Where one training run reads and writes; ``live_dir`` None: no DVCLive curves."""

    name: str
    base_model: Path
    train_file: Path
    adapter_out: Path
    checkpoints: Path
    summary_out: Path
    live_dir: Path | None = None
    params_file: Path = Path("params.yaml")  # named in errors about a param
    valid_file: Path | None = None  # validation records scored while training (none, or an empty file: no validation)
    labels_file: Path | None = None  # the label set of the validation records
    # The script that runs the training: its code deps are in the checkpoints' fingerprint (None: this module's).
    script: Path | None = None

"""Several training processes: the train stage hands itself to ``accelerate launch`` when asked for more than one.

accelerate starts the processes (``torchrun`` underneath for DDP and FSDP, ``deepspeed`` for ZeRO-3);
each runs the same stage script, which sees ``LOCAL_RANK`` and trains instead of launching again.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from lorapipe.errors import PipelineError

log = logging.getLogger(__name__)


def launched() -> bool:
    """Whether this process was started by a distributed launcher."""
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    """This process's rank among those launched together (``RANK``, which every launcher sets), 0 when alone.

    Not accelerate's ``PartialState().process_index``: under ``accelerate launch`` on a CPU it says 0 in every rank.
    """
    return int(os.environ.get("RANK", 0))


def accelerate_command(config: Path, processes: int, script: list[str]) -> list[str]:
    """``accelerate launch`` of ``script`` (a script path and its arguments) in ``processes`` processes."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        str(processes),
        *script,
    ]


def relaunch(config: Path, processes: int, script: list[str]) -> int:
    """Run ``script`` under accelerate in ``processes`` processes; its exit status."""
    if not config.is_file():
        raise PipelineError(f"{config}: no such accelerate config (train.accelerate_config)")
    command = accelerate_command(config, processes, script)
    log.info("launching %d processes: %s", processes, shlex.join(command))
    return subprocess.run(command, check=False).returncode

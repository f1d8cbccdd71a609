"""Run a command that dies with whoever started it, children and all.

A Ray worker that is killed (or whose node is lost) dies at once, with no chance to clean up; what it had started
(``dvc exp run`` and the stage it runs) would go on training and could still write. Each command therefore runs
under this module: a small keeper process that the kernel signals when its parent dies (``PR_SET_PDEATHSIG``, Linux),
and that then kills the command's whole process group.

    python -m lorapipe.tether PARENT_PID -- COMMAND ...
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def tethered(command: list[str]) -> list[str]:
    """``command`` wrapped so that it is killed, with every process in its group, when this process dies."""
    return [sys.executable, "-m", "lorapipe.tether", str(os.getpid()), "--", *command]


def run_tethered(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> int:
    """Run ``command`` tethered to this process, its output appended to ``log``; its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        return subprocess.run(tethered(command), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def main(argv: list[str]) -> int:
    parent, separator, *command = argv
    if separator != "--" or not command:
        raise SystemExit("usage: python -m lorapipe.tether PARENT_PID -- COMMAND ...")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != int(parent):  # the parent died before the signal was armed
        return 128 + signal.SIGTERM
    child = subprocess.Popen(command, start_new_session=True)

    def stop(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = child.wait()
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

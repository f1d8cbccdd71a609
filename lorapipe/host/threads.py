"""Threads: processes that share the cores (``dvc queue start -j 2``, two CPU DDP ranks) share the threads too.

Two torch processes each running as many threads as there are cores made a training step several times slower
(docs/your-machine.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

THREADS_ENV = "LORAPIPE_THREADS"


def host_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class CoreShare:
    """Threads = cores / the lorapipe workers running now on this machine, re-counted by :meth:`refresh`.

    Each worker holds a lock on its own file in a folder under the temporary directory; a file whose lock can be
    taken belongs to a finished process and is removed. ``LORAPIPE_THREADS`` pins the count; with
    ``OMP_NUM_THREADS`` set, torch's own setting is left alone.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or Path(tempfile.gettempdir()) / f"lorapipe-workers-{os.getuid()}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / str(os.getpid())
        # Locked under a hidden name first, so no other worker ever sees this file unlocked (and removes it).
        hidden = self.folder / f".{os.getpid()}"
        self.handle = open(hidden, "w")  # noqa: SIM115 (held open: the lock lives as long as the process)
        fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        hidden.replace(self.path)
        self.threads = 0

    def workers(self) -> int:
        """The lorapipe workers alive on this machine, this one included."""
        alive = 0
        for path in self.folder.iterdir():
            if path.name.startswith("."):
                continue
            if path == self.path:
                alive += 1
                continue
            try:
                with open(path) as other:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink(missing_ok=True)  # its owner has ended
            except BlockingIOError:
                alive += 1
            except OSError:
                continue
        return alive

    def refresh(self) -> int:
        """Set torch's thread count for the workers alive now; the count in force."""
        pinned = os.environ.get(THREADS_ENV)
        if pinned:
            threads = max(1, int(pinned))
        elif os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        else:
            workers = self.workers()
            threads = max(1, host_cores() // workers)
        if threads != self.threads:
            if self.threads:
                log.info(
                    "threads: %d -> %d (%d cores shared by the lorapipe workers running)",
                    self.threads,
                    threads,
                    host_cores(),
                )
            torch.set_num_threads(threads)
            self.threads = threads
        return threads

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self.handle.close()


_active: list[CoreShare] = []


@contextlib.contextmanager
def shared_cores() -> Iterator[CoreShare]:
    """A :class:`CoreShare` for the duration of a stage's work; :func:`refresh_threads` re-counts within."""
    share = CoreShare()
    share.refresh()
    log.info("threads: %d of %d cores", torch.get_num_threads(), host_cores())
    _active.append(share)
    try:
        yield share
    finally:
        _active.remove(share)
        share.close()


def refresh_threads() -> None:
    """Re-count the workers sharing the cores, inside :func:`shared_cores` (between batches); else nothing."""
    if _active:
        _active[-1].refresh()

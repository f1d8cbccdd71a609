"""Threads: a stage uses the cores that are free when it starts, and keeps that count to its end.

Free means not taken by other lorapipe workers (``dvc queue start -j 2``, two CPU DDP ranks) nor by other busy
processes (a browser, an IDE's indexer, a second terminal): two torch processes each running as many threads as
there are cores made a training step several times slower, and so did one busy neighbour in another session, which
Linux's autogroups give a fair share of the CPU whatever its nice value (docs/your-machine.md). The count is
decided once per stage and recorded (train summary, eval metrics): a count changed mid-run changed a trained
adapter's bytes on some CPUs, and DVC users expect a rerun to give the same bytes. A neighbour that starts
mid-run is logged, and costs at most about 2x thanks to the short OpenMP spin (``lorapipe/__init__.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

THREADS_ENV = "LORAPIPE_THREADS"


# How long the stage watches the machine before choosing its threads: a busy loop shows as a whole core within it.
BUSY_WINDOW = 0.5
WATCH_SECONDS = 2.5  # between two looks during the stage (each a few /proc reads)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> tuple[float, float, float]:
    """(the machine's busy CPU seconds, this process's own, a monotonic clock) now (Linux /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / CLOCK_TICKS, own.user + own.system, time.monotonic()


def busy_elsewhere(since: tuple[float, float, float]) -> float:
    """Cores' worth of CPU time that other processes used since ``since`` (a :func:`cpu_seconds` reading)."""
    now = cpu_seconds()
    elapsed = max(now[2] - since[2], 1e-3)
    return max(0.0, ((now[0] - since[0]) - (now[1] - since[1])) / elapsed)


def host_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class CoreShare:
    """Threads = the cores that neither other lorapipe workers nor other busy processes hold, chosen by
    :meth:`refresh` when the stage starts.

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
        self.busy = 0  # whole cores busy elsewhere when last looked
        self.watched = cpu_seconds()

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

    def free_cores(self, window: float = BUSY_WINDOW) -> int:
        """The cores free for this worker: its share among the lorapipe workers, less the cores that other
        processes kept busy over the next ``window`` seconds."""
        since = cpu_seconds()
        time.sleep(window)
        self.busy = round(busy_elsewhere(since))
        self.watched = cpu_seconds()
        return max(1, min(host_cores() // self.workers(), host_cores() - self.busy))

    def refresh(self) -> int:
        """Choose and set torch's thread count; the count in force."""
        pinned = os.environ.get(THREADS_ENV)
        if pinned:
            threads = max(1, int(pinned))
        elif os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        else:
            threads = self.free_cores()
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
        return threads

    def watch(self) -> None:
        """Log when other work takes or gives back cores (between steps or batches); the thread count stays."""
        if time.monotonic() - self.watched[2] < WATCH_SECONDS:
            return
        busy = round(busy_elsewhere(self.watched))
        self.watched = cpu_seconds()
        if busy != self.busy:
            log.info(
                "threads: other work now keeps %d of %d cores busy; this stage keeps its %d threads (the count is "
                "fixed per stage, so its arithmetic does not change mid-run)",
                busy,
                host_cores(),
                torch.get_num_threads(),
            )
            self.busy = busy

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self.handle.close()


_active: list[CoreShare] = []


@contextlib.contextmanager
def shared_cores() -> Iterator[CoreShare]:
    """A :class:`CoreShare` for the duration of a stage's work: threads chosen now; :func:`watch_cores` within."""
    share = CoreShare()
    share.refresh()
    log.info("threads: %d of %d cores (%d busy with other work)", torch.get_num_threads(), host_cores(), share.busy)
    _active.append(share)
    try:
        yield share
    finally:
        _active.remove(share)
        share.close()


def watch_cores() -> None:
    """Inside :func:`shared_cores` (between batches): log other work taking or giving back cores; else nothing."""
    if _active:
        _active[-1].watch()

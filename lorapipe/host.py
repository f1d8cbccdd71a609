"""Choices that depend on the machine, measured on it: CPU training precision, threads, peak memory.

CPUs differ more than their flags say: on one AVX-512 BF16 host a bf16 matrix product ran 2.7x faster than
fp32, on another, with the same flags, at 0.55x. So the precision is timed on the model's own forward and
backward before training (:func:`choose_precision`). Processes that share the cores (``dvc queue start -j 2``,
two CPU DDP ranks) share the threads too (:class:`CoreShare`): two torch processes each running as many
threads as there are cores made a training step 8-11x slower.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import functools
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CPU_PRECISIONS = ("fp32", "bf16")
RECHECK_LEAD = 2.0  # a precision that leads by less is timed again (choose_precision)
THREADS_ENV = "LORAPIPE_THREADS"


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision chosen and, when it was measured, each candidate's examples/s of forward + backward."""

    precision: str
    rates: dict[str, float] | None = None
    probe: str = "forward + backward"  # what the rates time

    @property
    def measured(self) -> bool:
        return self.rates is not None


def choose_precision(
    measure: Callable[[str], float],
    candidates: Sequence[str] = CPU_PRECISIONS,
    recheck_below: float = RECHECK_LEAD,
    probe: str = "forward + backward",
) -> PrecisionChoice:
    """The candidate with the highest rate that ``measure`` (precision -> examples/s) reports; logs all rates.

    When the leader's rate is less than ``recheck_below`` times the runner-up's, every candidate is measured once
    more, in the same order, and keeps its better rate: one timing each is at the mercy of the first step's cold
    allocations and of a shared host's slow seconds. On a 2-core Intel Xeon (AVX-512 BF16, no AMX) a train stage
    timed fp32 at 2.51 examples/s and bf16 at 2.82, trained in bf16 and took 434 s; the same probe run alone timed
    fp32's first step 1.2-1.5x slower than its second, and fp32 won every one of those probes.
    """
    rates = {precision: measure(precision) for precision in candidates}
    leader, *others = sorted(rates.values(), reverse=True)
    rounds = 1
    if others and leader < recheck_below * others[0]:
        rates = {precision: max(rate, measure(precision)) for precision, rate in rates.items()}
        rounds = 2
    rates = {precision: round(rate, 2) for precision, rate in rates.items()}
    choice = max(rates, key=lambda precision: rates[precision])
    log.info(
        "precision: %s measured faster on this CPU (%s examples/s, %s, best of %d)",
        choice,
        ", ".join(f"{precision} {rate:.2f}" for precision, rate in rates.items()),
        probe,
        rounds,
    )
    return PrecisionChoice(choice, rates, probe)


def step_timer(
    step: Callable[[str], None],
    rows: int,
    repeats: int = 1,
    warm_up: Callable[[str], None] | None = None,
    warm_up_rows: int | None = None,
) -> Callable[[str], float]:
    """A ``measure`` for :func:`choose_precision`: examples/s of ``step(precision)`` (``rows`` examples), best of
    ``repeats``, after one untimed ``warm_up(precision)`` (kernel selection, first allocations; ``step`` if None).

    A precision whose warm-up (``warm_up_rows`` examples) alone took longer than a full step of one timed before it
    cannot win, so it is not timed further: its rate is the warm-up's, in a later call too. Without that, bf16
    emulated on a CPU with no bf16 instructions (0.10 examples/s against fp32's 2.41 on an AVX2 host) made the probe
    take 3 minutes.
    """
    warm: set[str] = set()
    fastest: dict[str, float] = {}  # precision -> seconds of its best full step
    stopped: dict[str, float] = {}  # precision -> its warm-up's rate, for one not timed further

    def measure(precision: str) -> float:
        if precision in stopped:
            return stopped[precision]
        if precision not in warm:
            started = time.perf_counter()
            (warm_up or step)(precision)
            warm.add(precision)
            seconds = time.perf_counter() - started
            if warm_up_rows and fastest:
                leader, best = min(fastest.items(), key=lambda item: item[1])
                if seconds > best:
                    log.info(
                        "precision: %s's %d-row warm-up took %.1f s, longer than %d rows in %s (%.1f s): not timed"
                        " further",
                        precision, warm_up_rows, seconds, rows, leader, best,
                    )  # fmt: skip
                    stopped[precision] = warm_up_rows / seconds
                    return stopped[precision]
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            step(precision)
            best = min(best, time.perf_counter() - started)
        fastest[precision] = min(best, fastest.get(precision, best))
        return rows / best

    return measure


def all_ranks_agree(choice: PrecisionChoice) -> PrecisionChoice:
    """Under several processes, the choice from the rates summed over all ranks, so every rank trains alike."""
    if choice.rates is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return choice
    names = list(choice.rates)
    summed = torch.tensor([choice.rates[name] for name in names], dtype=torch.float64)
    torch.distributed.all_reduce(summed)
    rates = dict(zip(names, (round(float(v), 2) for v in summed), strict=True))
    return PrecisionChoice(max(rates, key=lambda name: rates[name]), rates, choice.probe)


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


ONEDNN_CACHE_CAPACITY = 32


def bound_onednn_cache() -> None:
    """Keep oneDNN's primitive cache to 32 entries (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, if not set already).

    On a CPU, bf16 autocast matmuls run through oneDNN, which caches a primitive (with its scratch and reordered
    weights) per shape, up to 1,024 of them. Batches of ever-changing lengths make new shapes at every step, so
    the cache, not the activations, made the mixed train stage's RSS creep from 2.1 to 3.3 GiB over its 82 steps
    (README: Your machine). Evaluation's fp32 kernel is oneDNN's too (``evaluation.kernels``), and its prompts
    come in as many lengths: base's eval stage peaked at 3,161 MiB uncapped, 2,445 capped. oneDNN reads it when it
    creates its first primitive, so this must run before the first matmul. 8 entries cost 30 % of the speed on an
    AMD EPYC; on an Intel Xeon with AMX, 128 still peaked at 3,006-3,103 MiB where 16 and 32 peaked at 2,741-2,745
    MiB at the same speed (README: Your machine).
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))


@functools.cache
def _glibc(function: str) -> Callable[..., int] | None:
    """``function`` of the C library on Linux (glibc's allocator controls), else None."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return getattr(ctypes.CDLL(name), function, None) if name else None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * 2**20  # the largest that glibc's own dynamic threshold reaches
TRIM_THRESHOLD = 2**30


def keep_freed_memory(mallopt: Callable[[int, int], int] | None = None) -> bool:
    """Have glibc keep freed blocks for reuse instead of unmapping them; whether it took both settings.

    A training step allocates and frees hundreds of activation tensors of ever-changing sizes. glibc hands
    blocks above its (dynamic) mmap threshold, and freed memory at the top of its heap, back to the system,
    so the next step's tensors land on fresh pages and fault each one in again. On a 2-core Intel Xeon
    (AVX-512 BF16, no AMX), 10 fp32 steps of 160 tweets took 4.8-4.9 s of system time and 0.48 million page
    faults with blocks up to 32 MiB kept, against 6.8-8.2 s and 0.85-0.91 million, and trained at 5.99-6.37
    against 5.45-5.93 examples/s, at the same peak memory (README: Your machine). Memory a user's own
    ``MALLOC_*`` or ``GLIBC_TUNABLES`` settings govern is left alone, as is every other C library.
    """
    if "GLIBC_TUNABLES" in os.environ or any(key.startswith("MALLOC_") for key in os.environ):
        return False
    mallopt = mallopt or _glibc("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def free_held_bytes() -> int | None:
    """The bytes glibc's allocator holds free in its heaps (``mallinfo2``; None where it has none)."""
    mallinfo2 = _glibc("mallinfo2")
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def release_free_memory(above: int = 0) -> None:
    """Hand the memory the allocator holds free back to the system (glibc's ``malloc_trim``; elsewhere nothing),
    if it holds more than ``above`` bytes free.

    Evaluation's batches allocate and free tensors of ever-changing sizes, and glibc kept the freed pages:
    eval_base crept from 1.9 to 3.0-3.2 GiB resident while far less was live. Trimming after every batch brought
    it down, but every batch then faulted its pages in afresh (4.4 million page faults, 13 s of system time for
    the base model); evaluation trims only once more than a set amount is held (README: Evaluation cost).
    """
    trim = _glibc("malloc_trim")
    if trim is None:
        return
    held = free_held_bytes() if above else None
    if held is None or held > above:
        trim(0)


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started or since :func:`reset_peak_rss`, in MiB."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):  # Linux: the high-water mark that reset_peak_rss resets
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def reset_peak_rss() -> bool:
    """Start :func:`peak_rss_mib` afresh from the memory resident now (Linux); whether it could.

    One eval process scores several models, and each model's metrics hold its own peak, not the process's.
    """
    try:
        PROC_CLEAR_REFS.write_text("5")  # 5: reset the peak resident set size (proc(5))
    except OSError:
        return False
    return True

"""Memory: oneDNN's primitive cache bound, glibc's allocator settings, peak resident memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


ONEDNN_CACHE_CAPACITY = 32


def bound_onednn_cache() -> None:
    """Keep oneDNN's primitive cache to 32 entries (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, if not set already).

    On a CPU, bf16 autocast matmuls (and evaluation's oneDNN fp32 kernel) run through oneDNN, which caches a
    primitive with its scratch memory per shape, up to 1,024 of them; batches of ever-changing lengths make new
    shapes at every step, and the cache, not the activations, took stages over 3 GiB. oneDNN reads the setting
    when it creates its first primitive, so this must run before the first matmul. Why 32: docs/your-machine.md.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))


@functools.cache
def _glibc(function: str) -> Callable[..., int] | None:
    """``function`` of the C library on Linux (glibc's allocator controls), else None; on Linux a missing one is
    said once, with what is done without it (another C library, or a glibc too old for ``mallinfo2``)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    found = getattr(ctypes.CDLL(name), function, None) if name else None
    if found is None:
        log.warning("fallback: the C library has no %s: %s", function, GLIBC_FALLBACKS.get(function, "not used"))
    return found


GLIBC_FALLBACKS = {
    "mallopt": "freed memory goes back to the system at the allocator's own thresholds",
    "mallinfo2": "glibc older than 2.33; freed memory is handed back after every evaluation batch",
    "malloc_trim": "freed memory is not handed back between evaluation batches",
}


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * 2**20  # the largest that glibc's own dynamic threshold reaches
TRIM_THRESHOLD = 2**30


def keep_freed_memory(mallopt: Callable[[int, int], int] | None = None) -> bool:
    """Have glibc keep freed blocks for reuse instead of unmapping them; whether it took both settings.

    A training step allocates and frees hundreds of activation tensors of ever-changing sizes. glibc hands
    blocks above its (dynamic) mmap threshold, and freed memory at the top of its heap, back to the system,
    so the next step's tensors land on fresh pages and fault each one in again (docs/your-machine.md). Memory a
    user's own
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

    Evaluation's batches allocate and free tensors of ever-changing sizes, and glibc kept the freed pages, which
    took eval_base towards 3 GiB while far less was live; trimming after every batch made every batch fault its
    pages in afresh, so evaluation trims only once more than a set amount is held (docs/evaluation-cost.md).
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


def available_memory_bytes() -> int | None:
    """The memory the kernel says can be had now without swapping (``MemAvailable``), or None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None

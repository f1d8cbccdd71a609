"""Choices that depend on the machine, measured on it: CPU training precision, threads, peak memory.

CPUs differ more than their flags say, so the precision is timed on the model's own forward and backward before
training (:func:`choose_precision`); processes that share the cores (``dvc queue start -j 2``, two CPU DDP ranks)
share the threads too (:class:`CoreShare`). What each was measured to do: docs/your-machine.md.

One module each: :mod:`~lorapipe.host.precision`, :mod:`~lorapipe.host.threads`, :mod:`~lorapipe.host.memory`.
"""

from lorapipe.host.memory import (
    available_memory_bytes,
    bound_onednn_cache,
    free_held_bytes,
    keep_freed_memory,
    peak_rss_mib,
    release_free_memory,
    reset_peak_rss,
)
from lorapipe.host.precision import PrecisionChoice, all_ranks_agree, choose_precision, step_timer
from lorapipe.host.threads import THREADS_ENV, CoreShare, host_cores, shared_cores, watch_cores

__all__ = [
    "THREADS_ENV",
    "CoreShare",
    "PrecisionChoice",
    "all_ranks_agree",
    "available_memory_bytes",
    "bound_onednn_cache",
    "choose_precision",
    "free_held_bytes",
    "host_cores",
    "keep_freed_memory",
    "peak_rss_mib",
    "release_free_memory",
    "reset_peak_rss",
    "shared_cores",
    "step_timer",
    "watch_cores",
]

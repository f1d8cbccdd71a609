"""CPU training precision, timed on the model's own forward and backward before training.

CPUs differ more than their flags say: bf16 ran faster than fp32 on one AVX-512 BF16 host and slower on another
with the same flags (docs/your-machine.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

CPU_PRECISIONS = ("fp32", "bf16")
RECHECK_LEAD = 2.0  # a precision that leads by less is timed again (choose_precision)


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
    allocations and of a shared host's slow seconds, which once picked the slower precision (docs/your-machine.md).
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
    emulated on a CPU with no bf16 instructions made the probe take minutes (docs/your-machine.md).
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

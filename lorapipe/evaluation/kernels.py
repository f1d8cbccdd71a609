"""Which fp32 matrix-product kernel evaluation runs the model's linear layers with, timed on this CPU.

torch sends an fp32 ``nn.Linear`` on a CPU to MKL's GEMM. On a 2-core AMD EPYC (Zen 4) oneDNN's fp32 kernel
ran the model's shapes 1.25-1.6x faster (194-210 against 120-168 GFLOP/s) with outputs within float rounding
of MKL's, and evaluation is three quarters matrix products; on other CPUs MKL may be the faster. So the eval
stage times both on the model's own weight shapes and uses the faster. Both compute in fp32: the labels and
answers are the fp32 ones (README: Evaluation cost).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

KERNELS = ("mkl", "onednn")
ROWS = 32 * 30  # a label-scoring batch: 32 tweets of about 30 tokens after the shared prefix


def onednn_linear(module: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward through oneDNN's fp32 kernel (dense input and output, the weight as it is)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), module.weight, module.bias, "none", [], "")

    return forward


def _linear_shapes(model) -> list[torch.nn.Linear]:
    """One linear layer of each weight shape in the model's blocks (the output head runs on a few rows only)."""
    head = model.get_output_embeddings()
    seen: dict[tuple[int, ...], torch.nn.Linear] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            seen.setdefault(tuple(module.weight.shape), module)
    return list(seen.values())


def time_kernel(model, kernel: str, repeats: int = 3) -> float:
    """GFLOP/s of ``kernel`` over one layer of each of the model's weight shapes, after a warm-up."""
    flops = seconds = 0.0
    with torch.inference_mode():
        for module in _linear_shapes(model):
            x = torch.randn(ROWS, module.in_features)
            run = onednn_linear(module) if kernel == "onednn" else module.forward
            run(x)
            started = time.perf_counter()
            for _ in range(repeats):
                run(x)
            seconds += time.perf_counter() - started
            flops += 2.0 * ROWS * module.in_features * module.out_features * repeats
    return flops / seconds / 1e9


def choose_kernel(measure: Callable[[str], float]) -> dict:
    """The kernel with the higher rate that ``measure`` (kernel -> GFLOP/s) reports, with both rates."""
    rates = {kernel: round(measure(kernel), 1) for kernel in KERNELS}
    choice = max(rates, key=lambda kernel: rates[kernel])
    log.info(
        "fp32 linear kernel: %s measured faster on this CPU (%s GFLOP/s)",
        choice,
        ", ".join(f"{kernel} {rate}" for kernel, rate in rates.items()),
    )
    return {"kernel": choice, "gflops": rates}


def use_faster_fp32_kernel(model, precision: str, measure: Callable[[str], float] | None = None) -> dict | None:
    """Time both kernels on ``model`` and route every linear layer through the faster; what was chosen.

    Only for fp32 inference on a CPU: bf16 autocast and CUDA keep torch's own path (None).
    """
    if precision != "fp32" or next(model.parameters()).device.type != "cpu":
        return None
    choice = choose_kernel(measure or (lambda kernel: time_kernel(model, kernel)))
    if choice["kernel"] == "onednn":
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = onednn_linear(module)
    return choice

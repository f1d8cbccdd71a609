"""Which fp32 matrix-product kernel evaluation runs the model's linear layers with, timed on this CPU.

torch sends an fp32 ``nn.Linear`` on a CPU to MKL's GEMM. On some CPUs oneDNN's fp32 kernel runs the model's
shapes much faster, with outputs within float rounding of MKL's, and evaluation is mostly matrix products; on
others MKL is the faster. So the eval stage times both on the model's own weight shapes and uses the faster;
both compute in fp32, so the labels and answers are the fp32 ones (docs/evaluation-cost.md).

oneDNN runs each weight from its own blocked layout. Handed a plain weight, it reorders it at every call; the
weights are reordered once here instead (``_reorder_linear_weight``), which gives the same outputs to the bit.
Each ``nn.Linear`` is replaced by a :class:`OneDNNLinear` holding only the reordered copy, as PEFT replaces the
layers it adapts.

The two kernels differ in the last digits of every logprob, so the choice decides the prediction files' bytes:
oneDNN is taken only when it leads by ``KERNEL_MARGIN`` (a close call takes MKL, torch's own path, so that a
shared host's load does not flip it between runs), the choice is recorded in the metrics, and
``eval.fp32_kernel`` pins it. oneDNN is reached through torch's private ``torch.ops.mkldnn`` operators: they
are checked on a small layer first, and a missing or changed one falls back to MKL with one warning (or stops
with one line where ``eval.fp32_kernel: onednn`` asks for it).
"""

from __future__ import annotations

import logging
import time

import torch

from lorapipe.errors import PipelineError
from lorapipe.models.loading import copy_out_of_mapped_file

log = logging.getLogger(__name__)

KERNELS = ("mkl", "onednn")
DEFAULT_KERNEL = "mkl"  # torch's own fp32 path: what a close call takes
KERNEL_MARGIN = 1.10  # oneDNN is taken only when its rate is at least this many times MKL's
ROWS = 32 * 30  # a label-scoring batch: 32 tweets of about 30 tokens after the shared prefix
DECODE_ROWS = 48  # a decoding step: one token of each answer still open


def reordered(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's blocked layout for a label-scoring batch's rows, reordered once."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS)


class OneDNNLinear(torch.nn.Module):
    """A linear layer run by oneDNN's fp32 kernel from its weight reordered once; a weight shared with another
    module (an output head tied to the input embeddings) stays the shared plain parameter, which oneDNN reorders
    at every call, as a reordered copy would hold the head's memory twice."""

    def __init__(self, linear: torch.nn.Linear, reorder: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.reorder = linear.in_features, linear.out_features, reorder
        if reorder:
            self.register_buffer("packed_weight", reordered(linear.weight), persistent=False)
        else:
            self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.packed_weight if self.reorder else self.weight
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, self.bias, "none", [], "")


def use_onednn_linears(model) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` by a :class:`OneDNNLinear`; how many were replaced."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                tied = child is head and child.weight is embeddings.weight
                setattr(parent, name, OneDNNLinear(child, reorder=not tied))
                replaced += 1
    return replaced


def onednn_problem() -> str | None:
    """Why oneDNN's private operators cannot be used here (missing, or changed: they raise or compute otherwise than
    ``F.linear`` on a small layer), or None where they can."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    generator = torch.Generator().manual_seed(0)
    x, weight = (torch.randn(shape, generator=generator) for shape in ((4, 16), (8, 16)))
    expected = torch.nn.functional.linear(x, weight)
    checks = (
        ("_reorder_linear_weight", lambda: reordered(weight), None),
        ("_linear_pointwise", lambda: torch.ops.mkldnn._linear_pointwise(x, reordered(weight), None, "none", [], ""),
         expected),
    )  # fmt: skip
    for name, run, want in checks:
        try:
            got = run()
        except (AttributeError, RuntimeError, TypeError) as err:
            first_line = (str(err).splitlines() or [""])[0]
            return f"torch.ops.mkldnn.{name} failed: {type(err).__name__}: {first_line}"
        if want is not None and (not torch.is_tensor(got) or not torch.allclose(got, want, rtol=1e-4, atol=1e-5)):
            return f"torch.ops.mkldnn.{name} no longer computes what F.linear does"
    return None


def available_kernels() -> tuple[str, ...]:
    """MKL (torch's own fp32 path) always; oneDNN where its operators work as expected (else one warning)."""
    problem = onednn_problem()
    if problem is None:
        return KERNELS
    log.warning("fallback: fp32 linear kernel mkl (torch's own): %s", problem)
    return KERNELS[:1]


def _linear_shapes(model) -> dict[tuple[int, ...], tuple[torch.nn.Linear, int]]:
    """One linear layer of each weight shape in the model's blocks, with how many layers have that shape (the
    output head runs on a few rows only)."""
    head = model.get_output_embeddings()
    shapes: dict[tuple[int, ...], tuple[torch.nn.Linear, int]] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            first, count = shapes.get(tuple(module.weight.shape), (module, 0))
            shapes[tuple(module.weight.shape)] = (first, count + 1)
    return shapes


def time_kernels(model, kernels: tuple[str, ...] = KERNELS, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of each kernel over the model's linear layers, timed on one layer of each weight shape (weighted by
    how many layers have it) at a label-scoring batch's rows and at a decoding step's, after a warm-up.

    The kernels take turns on each shape, so a slow second of a shared host falls on both rather than on one: timed
    one after the other, the two rates swapped order between runs on the same host.
    """
    flops, seconds = dict.fromkeys(kernels, 0.0), dict.fromkeys(kernels, 0.0)
    with torch.inference_mode():
        for module, layers in _linear_shapes(model).values():
            runs = {kernel: OneDNNLinear(module) if kernel == "onednn" else module.forward for kernel in kernels}
            for rows, times in ((ROWS, repeats), (DECODE_ROWS, repeats * ROWS // DECODE_ROWS)):
                x = torch.randn(rows, module.in_features)
                for kernel, run in runs.items():
                    run(x)
                    started = time.perf_counter()
                    for _ in range(times):
                        run(x)
                    seconds[kernel] += (time.perf_counter() - started) * layers
                    flops[kernel] += 2.0 * rows * module.in_features * module.out_features * times * layers
    return {kernel: flops[kernel] / seconds[kernel] / 1e9 for kernel in kernels}


def choose_kernel(rates: dict[str, float], margin: float = KERNEL_MARGIN) -> dict:
    """The kernel with the highest rate (kernel -> GFLOP/s) where it leads the default by ``margin``, else the
    default; with every rate and how it was chosen."""
    rates = {kernel: round(rate, 1) for kernel, rate in rates.items()}
    fastest = max(rates, key=lambda kernel: rates[kernel])
    close = fastest != DEFAULT_KERNEL and DEFAULT_KERNEL in rates and rates[fastest] < margin * rates[DEFAULT_KERNEL]
    choice = DEFAULT_KERNEL if close else fastest
    chosen_by = f"close call (within {margin - 1:.0%}): the default" if close else "measured faster"
    log.info(
        "fp32 linear kernel: %s, %s on this CPU (%s GFLOP/s)",
        choice,
        chosen_by,
        ", ".join(f"{kernel} {rate}" for kernel, rate in rates.items()),
    )
    return {"kernel": choice, "gflops": rates, "chosen_by": chosen_by}


def pinned_kernel(kernel: str) -> dict:
    """``eval.fp32_kernel`` set to a kernel: used as it is, untimed; oneDNN must work here."""
    if kernel == "onednn" and (problem := onednn_problem()) is not None:
        raise PipelineError(f"eval.fp32_kernel: onednn cannot run here ({problem}); set it to mkl or auto")
    log.info("fp32 linear kernel: %s (eval.fp32_kernel)", kernel)
    return {"kernel": kernel, "gflops": None, "chosen_by": "eval.fp32_kernel"}


def use_faster_fp32_kernel(
    model, precision: str, rates: dict[str, float] | None = None, pinned: str = "auto"
) -> dict | None:
    """Time the kernels on ``model`` (``rates``: their GFLOP/s, measured elsewhere; ``pinned``: a kernel to use
    untimed, ``eval.fp32_kernel``) and route every linear layer through the chosen one; what was chosen.

    With oneDNN, each linear layer is a :class:`OneDNNLinear` afterwards. Only
    for fp32 inference on a CPU: bf16 autocast and CUDA keep torch's own path (None).
    """
    if precision != "fp32" or next(model.parameters()).device.type != "cpu":
        return None
    if pinned != "auto":
        choice = pinned_kernel(pinned)
    else:
        choice = choose_kernel(rates or time_kernels(model, available_kernels()))
    if choice["kernel"] == "onednn":
        log.info("fp32 linear kernel: %d linear layers run by oneDNN", use_onednn_linears(model))
        copy_out_of_mapped_file(model.parameters())
    return choice

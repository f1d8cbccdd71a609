"""Which fp32 matrix-product kernel evaluation runs the model's linear layers with, timed on this CPU.

torch sends an fp32 ``nn.Linear`` on a CPU to MKL's GEMM. On a 2-core AMD EPYC (Zen 4) oneDNN's fp32 kernel
ran the model's shapes 1.25-1.6x faster (194-210 against 120-168 GFLOP/s) with outputs within float rounding
of MKL's, and evaluation is three quarters matrix products; on other CPUs MKL may be the faster. So the eval
stage times both on the model's own weight shapes and uses the faster. Both compute in fp32: the labels and
answers are the fp32 ones (README: Evaluation cost).

oneDNN runs each weight from its own blocked layout. Handed a plain weight, it reorders it at every call; the
weights are reordered once here instead (``_reorder_linear_weight``), which gives the same outputs to the bit
and, on the Zen 4, 6 % more speed for a label-scoring batch (1,100 rows), 20 % for a decoding step of 50 rows
and 90 % for one of 8 (README: Evaluation cost). The layers then hold only the reordered copy.

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
from collections.abc import Callable

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


def onednn_linear(module: torch.nn.Linear, reorder: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward through oneDNN's fp32 kernel, its weight reordered once into oneDNN's layout (or, if
    not ``reorder``, at every call, as oneDNN does with a plain weight: the same outputs)."""
    weight = reordered(module.weight) if reorder else module.weight
    bias = module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")

    return forward


def fused_gated_mlp(mlp: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A SiLU-gated MLP's forward (``down(silu(gate(x)) * up(x))``, Llama's and Mistral's) with the activation and
    the product done inside oneDNN's gate and up products, their weights reordered once; None for another MLP.

    Applied as each product's tile is computed, while it is in cache, rather than as two passes over
    rows x 1,536 floats: the same arithmetic up to float rounding (outputs within 1.5e-7 relative).
    """
    layers = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(layer, torch.nn.Linear) and layer.bias is None for layer in layers):
        return None
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU"):
        return None
    gate, up = (reordered(layer.weight) for layer in layers[:2])
    down = layers[2]

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        activated = torch.ops.mkldnn._linear_pointwise(x, gate, None, "swish", [], "")
        return down(torch.ops.mkldnn._linear_pointwise.binary(x, activated, up, None, "mul"))

    return forward


def onednn_problem() -> str | None:
    """Why oneDNN's private operators cannot be used here (missing, or changed: they raise or compute otherwise than
    ``F.linear`` on a small layer), or None where they can."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    generator = torch.Generator().manual_seed(0)
    x, weight, up = (torch.randn(shape, generator=generator) for shape in ((4, 16), (8, 16), (8, 16)))
    expected = torch.nn.functional.linear(x, weight)
    checks = (
        ("_reorder_linear_weight", lambda: reordered(weight), None),
        ("_linear_pointwise", lambda: torch.ops.mkldnn._linear_pointwise(x, reordered(weight), None, "none", [], ""),
         expected),
        ("_linear_pointwise.binary",
         lambda: torch.ops.mkldnn._linear_pointwise.binary(x, expected, reordered(up), None, "mul"),
         expected * torch.nn.functional.linear(x, up)),
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
            runs = {kernel: onednn_linear(module) if kernel == "onednn" else module.forward for kernel in kernels}
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

    With oneDNN, each layer keeps only its reordered weight: ``weight`` is None afterwards, except for an output
    head tied to the input embeddings, which stays plain. Only
    for fp32 inference on a CPU: bf16 autocast and CUDA keep torch's own path (None).
    """
    if precision != "fp32" or next(model.parameters()).device.type != "cpu":
        return None
    if pinned != "auto":
        choice = pinned_kernel(pinned)
    else:
        choice = choose_kernel(rates or time_kernels(model, available_kernels()))
    if choice["kernel"] == "onednn":
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        for module in model.modules():
            fused = fused_gated_mlp(module)
            if fused is not None:
                module.forward = fused
                module.gate_proj.weight = module.up_proj.weight = None  # their reordered copies are in ``fused``
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight is not None:
                # An output head tied to the input embeddings stays plain: with a reordered copy of SmolLM2's
                # head, eval_all peaked at 2,965-3,031 MiB instead of 2,849.
                tied = module is head and module.weight is embeddings.weight
                module.forward = onednn_linear(module, reorder=not tied)
                if not tied:
                    module.weight = None  # the reordered copy is the one used: the plain one is let go
        copy_out_of_mapped_file(model.parameters())
    return choice

"""Evaluation's fp32 kernel choice: a margin for close calls, recorded, pinnable, and a way out of torch's private
oneDNN operators."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import LABELS, instruction_rows, tweet_records
from lorapipe.config import PromptParams
from lorapipe.errors import PipelineError
from lorapipe.evaluation import kernels
from lorapipe.evaluation.evaluate import EvalData, evaluate_model, write_outputs
from lorapipe.evaluation.kernels import KERNELS, choose_kernel, use_faster_fp32_kernel
from lorapipe.models.loading import load_for_inference, load_tokenizer

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

PROMPT = PromptParams(
    system="You are a helpful assistant.",
    sentiment_template="Classify the sentiment of this tweet as positive or negative.\nTweet: {text}",
    instruction_template="{instruction}",
    instruction_with_input_template="{instruction}\n\nInput:\n{input}",
)


def test_a_close_call_takes_the_default_and_a_clear_lead_the_faster():
    close = choose_kernel({"mkl": 136.6, "onednn": 137.9})  # as timed on one 2-core AMD EPYC Zen 3
    assert close["kernel"] == "mkl" and close["chosen_by"].startswith("close call")
    assert choose_kernel({"mkl": 137.9, "onednn": 136.6})["kernel"] == "mkl"
    clear = choose_kernel({"mkl": 120.0, "onednn": 194.0})
    assert clear == {"kernel": "onednn", "gflops": {"mkl": 120.0, "onednn": 194.0}, "chosen_by": "measured faster"}
    assert choose_kernel({"mkl": 194.0, "onednn": 120.0})["kernel"] == "mkl"


def evaluation_bytes(tiny_model, tmp_path, rates=None, pinned="auto") -> tuple[dict, dict[str, bytes]]:
    """The kernel chosen and every prediction file's bytes of one evaluation of the tiny model."""
    from test_evaluation import eval_params

    model, tokenizer = load_for_inference(tiny_model), load_tokenizer(tiny_model, padding_side="left")
    chosen = use_faster_fp32_kernel(model, "fp32", rates=rates, pinned=pinned)
    data = EvalData(LABELS, tweet_records(PROMPT), instruction_rows(PROMPT), [])
    outputs = evaluate_model(model, tokenizer, data, eval_params())
    write_outputs(outputs, tmp_path / "metrics.json", tmp_path / "predictions")
    return chosen, {p.name: p.read_bytes() for p in sorted((tmp_path / "predictions").iterdir())}


def test_two_runs_on_one_host_give_byte_identical_predictions(tiny_model, tmp_path):
    # A shared host's load moves the two rates about one another: within the margin the choice stays the default.
    first = evaluation_bytes(tiny_model, tmp_path / "a", rates={"mkl": 136.6, "onednn": 137.9})
    second = evaluation_bytes(tiny_model, tmp_path / "b", rates={"mkl": 137.9, "onednn": 136.6})
    assert first[0]["kernel"] == second[0]["kernel"] == "mkl"
    assert first[1] == second[1]
    pinned = [evaluation_bytes(tiny_model, tmp_path / name, pinned="onednn") for name in ("c", "d")]
    assert pinned[0][0] == {"kernel": "onednn", "gflops": None, "chosen_by": "eval.fp32_kernel"}
    assert pinned[0][1] == pinned[1][1]


@pytest.mark.parametrize("operator", ["_reorder_linear_weight", "_linear_pointwise"])
def test_a_missing_or_changed_onednn_operator_falls_back_to_mkl_or_stops_where_pinned(
    tiny_model, monkeypatch, caplog, operator
):
    def raising(*args, **kwargs):
        raise RuntimeError(f"{operator} is gone in this torch")

    monkeypatch.setattr(torch.ops.mkldnn, operator, raising)
    with caplog.at_level(logging.WARNING):
        assert kernels.available_kernels() == ("mkl",)
    assert any(f"fallback: fp32 linear kernel mkl (torch's own): torch.ops.mkldnn.{operator}" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    model = load_for_inference(tiny_model)
    with pytest.raises(PipelineError, match=rf"eval.fp32_kernel: onednn cannot run here \(torch.ops.mkldnn.{operator}"):
        use_faster_fp32_kernel(model, "fp32", pinned="onednn")
    chosen = use_faster_fp32_kernel(model, "fp32")  # auto times MKL alone
    assert chosen["kernel"] == "mkl" and set(chosen["gflops"]) == {"mkl"}


def test_an_operator_that_computes_otherwise_is_not_used(monkeypatch):
    real = torch.ops.mkldnn._linear_pointwise

    class Shifted:
        def __call__(self, *args):
            return real(*args) + 1.0

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Shifted())
    assert kernels.onednn_problem() == "torch.ops.mkldnn._linear_pointwise no longer computes what F.linear does"
    monkeypatch.undo()
    assert kernels.onednn_problem() is None and kernels.available_kernels() == KERNELS

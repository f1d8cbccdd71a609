"""``eval``: batch sizes, answer lengths, precision and kernels of evaluation."""

from __future__ import annotations

from typing import Literal

from lorapipe.config.fields import Section, doc


class EvalParams(Section):
    batch_size: int = doc("tweets per label-scoring batch", gt=0)
    generation_batch_size: int = doc("instructions per generation batch", gt=0)
    # Decoding sets room aside for every new token up front, so the bound is a memory bound too; no base here
    # reads past 32,768 tokens, and the eval stage checks the model's own context and memory before decoding.
    max_new_tokens: int = doc("longest generated answer to an instruction, in tokens", gt=0, le=32768)
    sentiment_max_new_tokens: int = doc("longest generated answer to a tweet, in tokens", gt=0, le=32768)
    max_prompt_tokens: int = doc(
        "longest prompt scored or answered, in tokens; longer ones are cut in the middle (counted in the metrics)",
        gt=8,
    )
    sentiment_size: int | None = doc("score only the first N test tweets; null: all", gt=0)
    instruction_size: int | None = doc("answer only the first N test instructions; null: all", gt=0)
    precision: Literal["fp32", "bf16"] = doc("inference precision on a CPU: fp32, or bf16 autocast")
    fp32_kernel: Literal["auto", "mkl", "onednn"] = doc(
        "fp32 linear kernel on a CPU: auto times both and takes oneDNN only if clearly faster (a close call: MKL); "
        "mkl or onednn pins it, so that prediction bytes do not depend on a timing"
    )
    adapter_base: Literal["as_trained", "merged"] = doc(
        "as_trained: an adapter trained on the 4-bit base is scored unmerged on it (needs CUDA); "
        "merged: merged into the full-precision base"
    )
    bertscore_model: str = doc("BERTScore encoder: a folder, an installed package that ships one, or a hub id")
    bertscore_num_layers: int = doc("encoder layers BERTScore reads", gt=0)

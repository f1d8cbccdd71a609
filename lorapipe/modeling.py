"""Base models and adapters: conversion to safetensors, loading, device and precision choices."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lorapipe.config import TrainParams
from lorapipe.errors import PipelineError

log = logging.getLogger(__name__)


def materialize_base_model(raw: Path, out: Path) -> dict:
    """Write ``out`` as safetensors + config + tokenizer from a GGUF file or a safetensors folder."""
    if raw.is_file() and raw.suffix == ".gguf":
        return _convert_gguf(raw, out)
    if raw.is_dir():
        if not list(raw.glob("*.safetensors")):
            raise PipelineError(f"{raw}: no .safetensors weights (model.source); other weight formats are refused")
        shutil.copytree(raw, out, dirs_exist_ok=True)
        return {"format": "safetensors"}
    raise PipelineError(f"{raw}: model.source must give a .gguf file or a folder of safetensors")


def _convert_gguf(gguf: Path, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (dequantised to fp32)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF load leaves a quantizer attached that blocks save_pretrained.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"format": "gguf", "parameters": sum(p.numel() for p in model.parameters())}


def load_tokenizer(path: str | Path, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


@dataclass(frozen=True)
class Hardware:
    """What training will run on, decided once from the params and the machine."""

    device: str
    precision: str
    quantize_4bit: bool
    optim: str
    fallbacks: tuple[str, ...]


def choose_hardware(train: TrainParams, cuda: bool | None = None) -> Hardware:
    """CUDA gets QLoRA (4-bit nf4, paged optimizer, fp16); a CPU gets plain LoRA and says so."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    fallbacks: list[str] = []
    if cuda:
        precision = "fp16" if train.precision == "auto" else train.precision
        quantize = train.quantization in ("auto", "4bit")
        return Hardware("cuda", precision, quantize, train.optim, ())
    precision = train.cpu_precision if train.precision in ("auto", "fp16") else train.precision
    if train.precision == "fp16":
        fallbacks.append(f"fp16 needs CUDA: training in {precision} on the CPU")
    elif train.precision == "auto":
        fallbacks.append(f"no CUDA: training in {precision} instead of fp16")
    if train.quantization != "none":
        fallbacks.append("no CUDA: 4-bit nf4 quantization off (bitsandbytes has no CPU autograd), plain LoRA")
    optim = train.optim
    if "paged" in optim or "bnb" in optim or "8bit" in optim:
        fallbacks.append(f"no CUDA: optimizer {optim} replaced by {train.cpu_optim}")
        optim = train.cpu_optim
    return Hardware("cpu", precision, False, optim, tuple(fallbacks))


def load_causal_lm(path: str | Path, hardware: Hardware | None = None, dtype: torch.dtype = torch.float32):
    """Load a base model from safetensors, 4-bit where the hardware asks for it. Never remote code."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True}
    if hardware is not None and hardware.quantize_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if hardware.precision == "bf16" else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True
        )
        kwargs["dtype"] = compute
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise PipelineError(f"{path}: cannot load the model: {err}") from None


def require_adapter(adapter: Path) -> Path:
    """``adapter`` itself if it holds a PEFT adapter, else a clear error."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise PipelineError(f"{adapter}: no adapter_config.json (train it with dvc repro, or dvc pull it)")
    return Path(adapter)


def load_for_inference(base: str | Path, adapter: str | Path | None = None):
    """The base model in fp32 (fast on CPUs without AVX-512), with an adapter merged in if given; on a GPU if any."""
    model = load_causal_lm(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, require_adapter(adapter)).merge_and_unload()
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()

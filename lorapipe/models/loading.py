"""Base models and adapters: conversion to safetensors, loading, device and precision choices."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lorapipe.config import TrainParams
from lorapipe.errors import PipelineError

log = logging.getLogger(__name__)


def load_tokenizer(path: str | Path, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return chat_template_with_bos(tokenizer)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first when it encodes plain text (Llama, Mistral), i.e. the model
    was pre-trained with it."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def chat_template_with_bos(tokenizer):
    """``tokenizer`` with ``{{ bos_token }}`` put first in its chat template where the model expects a BOS token
    and the template does not write one (Mistral's and zephyr's do not).

    Training (TRL tokenises the rendered chat without special tokens) and decoding both start from the template,
    so a template without the BOS token silently trains and scores a model on inputs unlike its pre-training.
    """
    template = tokenizer.chat_template
    if not isinstance(template, str) or not adds_bos(tokenizer):
        return tokenizer
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    if not rendered.startswith(tokenizer.bos_token):
        log.info("chat template writes no %s; it is put first, as the model was pre-trained", tokenizer.bos_token)
        tokenizer.chat_template = "{{ bos_token }}" + template
    return tokenizer


@dataclass(frozen=True)
class Hardware:
    """What training will run on, decided once from the params and the machine."""

    device: str
    precision: str
    quantize_4bit: bool
    optim: str
    fallbacks: tuple[str, ...]
    attention: str = "sdpa"
    device_map: dict | None = None


def sharded_launch() -> bool:
    """Whether accelerate launched this process for FSDP or DeepSpeed (they place the weights themselves)."""
    return any(os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true" for name in ("FSDP", "DEEPSPEED"))


def choose_hardware(train: TrainParams, cuda: bool | None = None) -> Hardware:
    """CUDA gets QLoRA (4-bit nf4, paged optimizer, fp16); a CPU gets plain LoRA and says so.

    On a CPU the precision may be ``auto``: the train stage times both before training.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    fallbacks: list[str] = []
    if cuda:
        precision = "fp16" if train.precision == "auto" else train.precision
        quantize = train.quantization in ("auto", "4bit")
        # A 4-bit model is placed at load time: on this process's GPU, unless FSDP or ZeRO-3 shard it.
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if quantize and not sharded_launch() else None
        attention = "sdpa" if train.attention == "auto" else train.attention
        return Hardware("cuda", precision, quantize, train.optim, (), attention, device_map)
    # "auto" stays until the train stage has timed both precisions on this CPU (lorapipe.host.choose_precision).
    precision = train.cpu_precision if train.precision in ("auto", "fp16") else train.precision
    shown = "the faster of fp32 and bf16 autocast, timed here" if precision == "auto" else precision
    if train.precision == "fp16":
        fallbacks.append(f"fp16 needs CUDA: training in {shown} on the CPU")
    elif train.precision == "auto":
        fallbacks.append(f"no CUDA: training in {shown} instead of fp16")
    if train.quantization != "none":
        fallbacks.append("no CUDA: 4-bit nf4 quantization off (bitsandbytes has no CPU autograd), plain LoRA")
    optim = train.optim
    if "paged" in optim or "bnb" in optim or "8bit" in optim:
        fallbacks.append(f"no CUDA: optimizer {optim} replaced by {train.cpu_optim}")
        optim = train.cpu_optim
    # On a CPU the eager attention trains these short sequences faster than SDPA's kernels (benchmarks/).
    attention = "eager" if train.attention == "auto" else train.attention
    return Hardware("cpu", precision, False, optim, tuple(fallbacks), attention)


def _frozen_linears(model) -> list[torch.nn.Linear]:
    """The linear layers with a frozen fp32 weight, the output head aside (tied to the embeddings here)."""
    head = model.get_output_embeddings()
    return [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
        and module is not head
        and getattr(module, "weight", None) is not None
        and module.weight.dtype == torch.float32
        and not module.weight.requires_grad
    ]


def store_frozen_linears_in_bf16(model) -> int:
    """Keep the frozen linear weights in bf16 for bf16-autocast training; how many layers were converted.

    Autocast casts a frozen fp32 weight to bf16 at every use (it caches only casts of weights that require
    grad) and keeps each copy for the backward pass: the same numbers, computed anew every step. Stored in
    bf16 once (after PEFT has made and initialised the LoRA weights, which stay fp32), the matrix products see
    bit-identical operands (``tests/test_training.py``), and a step is faster and holds less. The output head,
    tied to the embeddings here, stays fp32 like the norms.
    """
    linears = _frozen_linears(model)
    for module in linears:
        module.to(torch.bfloat16)
    copy_out_of_mapped_file(p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32)
    return len(linears)


def copy_out_of_mapped_file(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Give ``parameters`` memory of their own. Weights loaded from safetensors view the memory-mapped file, and
    while any of them does, all of the file's pages that were read stay resident: once the other weights are
    replaced (stored in bf16, reordered for oneDNN), copying out the few left (embeddings, norms) lets the file's
    fp32 weights go."""
    for parameter in parameters:
        parameter.data = parameter.data.clone()


@contextlib.contextmanager
def frozen_linears_in_bf16(model) -> Iterator[None]:
    """Inside: the frozen linear weights in bf16, as bf16 training stores them; after: the fp32 ones again.

    The precision probe times bf16 this way, so that it measures the step training will run rather than one
    that also casts every weight at every use (which made the probe pick fp32 where bf16 trains faster).
    """
    kept = [(module.weight, module.weight.data) for module in _frozen_linears(model)]
    for weight, data in kept:
        weight.data = data.to(torch.bfloat16)
    try:
        yield
    finally:
        for weight, data in kept:
            weight.data = data


def corrupt_safetensors(folder: Path) -> Path | None:
    """The first ``*.safetensors`` file in ``folder`` whose header does not parse or whose data is cut short."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return path
    return None


def _load_error(folder: Path, err: Exception, restore: str) -> PipelineError:
    bad = corrupt_safetensors(folder)
    if bad is not None:
        return PipelineError(f"{bad}: corrupt or truncated safetensors file; restore it with {restore}")
    return PipelineError(f"{folder}: cannot load the weights: {str(err).strip().splitlines()[0]}")


def _restore_hint(path: Path) -> str:
    return f"`dvc checkout {path}` (or `dvc pull {path}`), or rerun the stage that writes it"


def load_causal_lm(
    path: str | Path, hardware: Hardware | None = None, dtype: torch.dtype = torch.float32, attention: str = "sdpa"
):
    """Load a base model from safetensors, 4-bit where the hardware asks for it. Never remote code."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    kwargs: dict = {
        "dtype": dtype,
        "trust_remote_code": False,
        "use_safetensors": True,
        "attn_implementation": attention,
    }
    if hardware is not None and hardware.quantize_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if hardware.precision == "bf16" else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
            # FSDP and DeepSpeed ZeRO-3 shard the 4-bit weights as tensors of this dtype (PEFT's QLoRA guides).
            bnb_4bit_quant_storage=compute,
        )
        kwargs["dtype"] = compute
        if hardware.device_map is not None:
            kwargs["device_map"] = hardware.device_map
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (SafetensorError, OSError, ValueError) as err:
        raise _load_error(Path(path), err, _restore_hint(Path(path))) from None


def require_adapter(adapter: Path) -> Path:
    """``adapter`` itself if it holds a PEFT adapter, else a clear error."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise PipelineError(f"{adapter}: no adapter_config.json (train it with dvc repro, or dvc pull it)")
    if not (Path(adapter) / "adapter_model.safetensors").is_file():
        # PEFT would fall back to adapter_model.bin, a pickle: loading one runs whatever it holds.
        pickled = " (only a pickled adapter_model.bin, which is never loaded: save it as safetensors)"
        shown = pickled if (Path(adapter) / "adapter_model.bin").is_file() else ""
        raise PipelineError(f"{adapter}: no adapter_model.safetensors{shown}")
    return Path(adapter)


def tokenizer_dir(base: Path, adapter: Path | None) -> Path:
    """Where the tokenizer comes from: the adapter folder if it holds one, else the base model."""
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return Path(adapter)
    return Path(base)


def load_for_inference(
    base: str | Path, adapter: str | Path | None = None, precision: str = "fp32", four_bit: str | None = None
):
    """The base model with an adapter, on a GPU if there is one: merged in, or with ``four_bit`` (its compute
    precision) unmerged on the 4-bit base as QLoRA trained it (see :func:`lorapipe.models.adapters.scoring_base`).

    fp32 weights on a CPU (bf16 there means autocast, see :func:`inference_precision`); on a GPU, bf16
    precision loads bf16 weights (fp16 where the GPU has no bf16), half the memory of fp32.
    """
    from safetensors import SafetensorError

    cuda = torch.cuda.is_available()
    dtype = torch.float32
    if cuda and precision == "bf16":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if four_bit is not None:
        hardware = Hardware("cuda", four_bit, True, "", (), device_map={"": torch.cuda.current_device()})
        model = load_causal_lm(base, hardware)
    else:
        model = load_causal_lm(base, dtype=dtype, attention="sdpa")
    if adapter is not None:
        from peft import PeftModel

        adapter = require_adapter(Path(adapter))
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise _load_error(adapter, err, _restore_hint(adapter)) from None
        check_adapter_loaded(model, adapter)
        if four_bit is None:
            model = model.merge_and_unload()
    if cuda and four_bit is None:
        model = model.to("cuda")
    return model.eval()


def check_adapter_loaded(model, adapter: Path) -> None:
    """Every weight in the adapter file went into the model; PEFT only warns about those that did not (a module
    named ``qq_proj`` in the file would leave ``q_proj`` unadapted)."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return
    with safe_open(str(weights), framework="pt") as handle:
        saved = set(handle.keys())
    loaded = set(get_peft_model_state_dict(model))
    if saved - loaded:
        first = sorted(saved - loaded)[0]
        raise PipelineError(
            f"{weights}: {len(saved - loaded)} of its {len(saved)} weights match no module of the base model, "
            f"e.g. {first}; it was trained on another architecture or its file was changed"
        )
    if loaded - saved:
        first = sorted(loaded - saved)[0]
        raise PipelineError(f"{weights}: {len(loaded - saved)} weights its config asks for are missing, e.g. {first}")


@contextlib.contextmanager
def inference_precision(precision: str, device: torch.device) -> Iterator[None]:
    """On a CPU, bf16 autocast around inference when ``precision`` is bf16; nothing otherwise."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16" and device.type == "cpu"):
        yield

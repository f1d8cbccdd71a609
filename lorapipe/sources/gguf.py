"""Base models as the fetch stage writes them: safetensors, from a GGUF file or a safetensors folder."""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from lorapipe.errors import PipelineError

log = logging.getLogger(__name__)


def materialize_base_model(raw: Path, out: Path, shown_as: str) -> dict:
    """Write ``out`` as safetensors + config + tokenizer from a GGUF file or a safetensors folder.

    ``shown_as`` names the source in errors (``raw`` is a copy in the stage's scratch folder).
    """
    if raw.is_file() and raw.suffix == ".gguf":
        return _convert_gguf(raw, out)
    if raw.is_dir():
        if not list(raw.glob("*.safetensors")):
            raise PipelineError(f"{shown_as}: no .safetensors weights (model.source); other weight formats are refused")
        shutil.copytree(raw, out, dirs_exist_ok=True)
        return {"format": "safetensors"}
    raise PipelineError(f"{shown_as}: model.source must give a .gguf file or a folder of safetensors")


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within: each GGUF file parsed once, and gguf's tensor-name map built once per architecture.

    transformers parses the file for the config, again for the tokenizer and again for the weights, and builds
    the name map anew for every tensor: about half of the conversion's time (docs/your-machine.md). Both are pure
    functions of their arguments; the originals are restored on exit. This relies on transformers looking them up
    on the ``gguf`` module at each call: where gguf lacks them, or transformers never called the cached reader,
    one warning says the conversion ran (or will run) without the cache, with the same output.
    """
    import gguf

    try:
        reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    except AttributeError as err:
        log.warning("fallback: GGUF parsed without a cache: gguf %s has no %s", gguf_version(), err.name)
        yield
        return
    cached = functools.cache(reader)
    gguf.GGUFReader, gguf.get_tensor_name_map = cached, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    if cached.cache_info().misses == 0:
        log.warning(
            "fallback: GGUF parsed without a cache: transformers no longer reads it through gguf.GGUFReader "
            "(slower, same output)"
        )


def gguf_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _convert_gguf(gguf: Path, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (dequantised to fp32)", gguf.name)
    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF load leaves a quantizer attached that blocks save_pretrained.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"format": "gguf", "parameters": sum(p.numel() for p in model.parameters())}

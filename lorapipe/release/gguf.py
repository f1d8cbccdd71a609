"""A merged model as one GGUF file, the format llama.cpp, Ollama and LM Studio read, with gguf (llama.cpp's own
writer): weights, byte-level BPE tokenizer, special tokens and the chat template the adapter was trained with."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorapipe.errors import PipelineError
from lorapipe.models.loading import adds_bos

log = logging.getLogger(__name__)

# llama.cpp runs Mistral-architecture models as "llama" (its converter writes them so too).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}


@dataclass(frozen=True)
class GGUFType:
    name: str  # as llama.cpp names files: F32, F16, Q8_0
    file_type: int  # general.file_type (llama.cpp's LlamaFileType)


GGUF_TYPES = {"f32": GGUFType("F32", 0), "f16": GGUFType("F16", 1), "q8_0": GGUFType("Q8_0", 7)}


def write_gguf(model, tokenizer, path: Path, out_type: str, name: str) -> dict:
    """Write ``model`` (merged, full precision) and ``tokenizer`` to ``path``; return what was written.

    Norms stay F32 in every type, as llama.cpp's converter keeps them; Q8_0 quantizes each matrix whose rows
    split into 32-value blocks and writes the others F16.
    """
    import gguf

    config = model.config
    arch = _architecture(config)
    gtype = GGUF_TYPES[out_type]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_hyperparameters(writer, config)
    writer.add_file_type(gtype.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    for gguf_name, tensor in _tensors(model, arch):
        data, raw_dtype = _encode(tensor, out_type)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": path.name, "type": gtype.name, "bytes": path.stat().st_size}


def _architecture(config) -> str:
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise PipelineError(
            f"config.json: architectures: {architecture} has no GGUF export here (supported: "
            f"{', '.join(ARCHITECTURES)}); export safetensors and use llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise PipelineError(f"config.json: rope_parameters: rope_type {rope['rope_type']} has no GGUF export here")
    return ARCHITECTURES[architecture]


def _add_hyperparameters(writer, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) model: tokens by id, their types, the merges,
    the special ids, whether a BOS is added, and the chat template."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(pre):
        raise PipelineError(
            "tokenizer.json: model: only byte-level BPE tokenizers (llama.cpp's gpt2 type) have a GGUF export "
            "here; export safetensors and use llama.cpp's convert_hf_to_gguf.py"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    token_types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], token_types[index] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            token_types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(pre))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(pre: dict) -> str:
    """llama.cpp's name for the split before byte-level BPE: GPT-2's regex, or with digits one by one first
    (SmolLM's original tokenizer.json); a tokenizer read from a GGUF file (the embedded base) has GPT-2's."""
    steps = pre.get("pretokenizers", [pre])
    if any(step.get("type") == "Digits" and step.get("individual_digits") for step in steps):
        return "smollm"
    if not any(step.get("type") == "ByteLevel" and step.get("use_regex", True) for step in steps):
        log.warning("tokenizer.json: pre_tokenizer: not GPT-2's split; llama.cpp will split with GPT-2's regex")
    return "gpt2"


def _tensors(model, arch: str):
    """(GGUF name, fp32 tensor) for every weight, q and k rows reordered to llama.cpp's rotary layout."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = names.get_name(stem)
        if gguf_stem is None:
            raise PipelineError(f"{hf_name}: no GGUF name for this {arch} weight")
        tensor = tensor.detach().to(torch.float32)
        if stem.endswith("self_attn.q_proj"):
            tensor = _permute(tensor, heads)
        elif stem.endswith("self_attn.k_proj"):
            tensor = _permute(tensor, kv_heads)
        yield f"{gguf_stem}.{suffix}", tensor


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary embedding pairs neighbouring values, Hugging Face's the two halves of each head."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _encode(tensor: torch.Tensor, out_type: str):
    """The tensor's data as the file stores it, and its GGML type when that is not the array's own dtype."""
    import gguf

    data = tensor.numpy()
    if data.ndim == 1 or out_type == "f32":
        return data, None
    if out_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None

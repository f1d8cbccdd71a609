"""An adapter merged into its full-precision base: standalone safetensors, or one GGUF file with a Modelfile."""

from __future__ import annotations

import logging
from pathlib import Path

from lorapipe.decoding import stop_ids
from lorapipe.errors import PipelineError
from lorapipe.io import atomic_dir, read_json, write_json
from lorapipe.models.adapters import load_adapted, scoring_base
from lorapipe.models.loading import adds_bos, load_tokenizer, tokenizer_dir
from lorapipe.release.gguf import GGUF_TYPES, write_gguf
from lorapipe.release.modelfile import ollama_template, render_modelfile

log = logging.getLogger(__name__)


def export_merged(
    base: Path,
    adapter: Path,
    out: Path,
    force: bool = False,
    allow_other_base: bool = False,
    gguf_type: str | None = None,
    system: str | None = None,
) -> dict:
    """Write ``out``: merged fp32 safetensors with config, tokenizer and chat template; or, with ``gguf_type``
    (f32, f16, q8_0), ``<adapter>.<TYPE>.gguf`` and an Ollama ``Modelfile`` whose ``SYSTEM`` is ``system``.

    An existing non-empty ``out`` is replaced only with ``force``, and never when it would take the adapter, the
    base model or the repository with it.
    """
    check_output_folder(out, {"--adapter": adapter, "--base": base})
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise PipelineError(f"{out}: exists and is not empty; pass --force to replace it")
    check_full_precision(base)
    if scoring_base(adapter, as_trained=True, cuda=True).quantize_4bit:
        log.warning(
            "%s was trained on the 4-bit base; merging into 4-bit weights would round the update away, so it is "
            "merged into the full-precision base (%s) instead",
            adapter,
            base,
        )
    model, _ = load_adapted(base, adapter, as_trained=False, allow_other_base=allow_other_base)  # merged in fp32
    tokenizer = load_tokenizer(tokenizer_dir(base, adapter))
    with atomic_dir(out) as staging:
        if gguf_type is None:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            return {"format": "safetensors", "folder": str(out)}
        name = Path(adapter).resolve().name
        written = write_gguf(model, tokenizer, staging / f"{name}.{GGUF_TYPES[gguf_type].name}.gguf", gguf_type, name)
        stops = [tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_ids(model, tokenizer))]
        template = ollama_template(tokenizer, strip_bos=adds_bos(tokenizer))
        (staging / "Modelfile").write_text(render_modelfile(written["file"], template, stops, system))
        write_json(staging / "export.json", {**written, "adapter": str(adapter), "base": str(base), "stop": stops})
    log.info("%s: %s, %.1f MiB, and a Modelfile", out, written["file"], written["bytes"] / 2**20)
    return written


def check_full_precision(base: Path) -> None:
    """Refuse a base stored quantized: the merge would round the low-rank update into its coarse weights."""
    config = Path(base) / "config.json"
    quantization = read_json(config).get("quantization_config") if config.is_file() else None
    if quantization:
        raise PipelineError(
            f"{config}: quantization_config: the base is stored quantized "
            f"({quantization.get('quant_method', '?')}); merge into its full-precision weights instead"
        )


def check_output_folder(out: Path, kept: dict[str, Path]) -> None:
    """Refuse an output folder that is, holds or lies inside a folder that must survive the export, or that is or
    holds the current folder (the repository)."""
    target, here = out.resolve(), Path.cwd().resolve()
    if target == here or target in here.parents:
        raise PipelineError(f"{out}: is or holds the current folder ({here}); choose a folder of its own")
    for name, folder in kept.items():
        folder = folder.resolve()
        if target == folder or folder in target.parents or target in folder.parents:
            raise PipelineError(f"{out}: is, holds or lies inside {name} ({folder}); choose a folder of its own")

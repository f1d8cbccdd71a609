"""Merge a LoRA adapter into its base model and save full safetensors weights.

``python -m lorapipe.cli.export --adapter models/adapters/sentiment --out exported/sentiment [--force]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.errors import PipelineError
from lorapipe.io import atomic_dir, run_stage
from lorapipe.models.adapters import load_adapted
from lorapipe.models.loading import load_tokenizer, tokenizer_dir


def export_merged(base: Path, adapter: Path, out: Path, force: bool = False, allow_other_base: bool = False) -> Path:
    """Write ``out`` as a standalone model: merged fp32 safetensors, config, tokenizer and chat template.

    An existing non-empty ``out`` is replaced only with ``force``, and never when it would take the adapter, the
    base model or the repository with it.
    """
    check_output_folder(out, {"--adapter": adapter, "--base": base})
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise PipelineError(f"{out}: exists and is not empty; pass --force to replace it")
    model, _ = load_adapted(base, adapter, as_trained=False, allow_other_base=allow_other_base)  # merged in fp32
    tokenizer = load_tokenizer(tokenizer_dir(base, adapter))
    with atomic_dir(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return out


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--allow-other-base", action="store_true", help="use an adapter trained on another base")
    args = parser.parse_args()
    run_stage("export", lambda: export_merged(args.base, args.adapter, args.out, args.force, args.allow_other_base))


if __name__ == "__main__":
    main()

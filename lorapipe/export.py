"""Merge a LoRA adapter into its base model and save full safetensors weights.

``python -m lorapipe.export --adapter models/adapters/sentiment --out exported/sentiment``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.io import atomic_dir, run_stage
from lorapipe.modeling import load_for_inference, load_tokenizer


def export_merged(base: Path, adapter: Path, out: Path) -> Path:
    """Write ``out`` as a standalone model: merged fp32 safetensors, config, tokenizer and chat template."""
    model = load_for_inference(base, adapter)
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer_config.json").exists() else base)
    with atomic_dir(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run_stage("export", lambda: export_merged(args.base, args.adapter, args.out))


if __name__ == "__main__":
    main()

"""Merge a LoRA adapter into its full-precision base: safetensors, or one GGUF file plus an Ollama Modelfile.

python -m lorapipe.cli.export --adapter models/adapters/sentiment --out exported/sentiment [--force]
python -m lorapipe.cli.export --adapter models/adapters/sentiment --out exported/sentiment-gguf --format gguf
    [--gguf-type f16|f32|q8_0]; then: cd exported/sentiment-gguf && ollama create sentiment -f Modelfile
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.io import run_stage
from lorapipe.release.gguf import GGUF_TYPES
from lorapipe.release.merged import export_merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors")
    parser.add_argument("--gguf-type", choices=sorted(GGUF_TYPES), default="f16")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="its prompt.system goes to SYSTEM")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--allow-other-base", action="store_true", help="use an adapter trained on another base")
    args = parser.parse_args()

    def export() -> dict:
        gguf = args.format == "gguf"
        system = load_params(args.params).prompt.system if gguf and args.params.is_file() else None
        return export_merged(
            args.base,
            args.adapter,
            args.out,
            args.force,
            args.allow_other_base,
            args.gguf_type if gguf else None,
            system,
        )

    run_stage("export", export)


if __name__ == "__main__":
    main()

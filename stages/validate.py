"""validate: check params.yaml before any stage runs, so that a bad value never costs an output.

    python stages/validate.py --params params.yaml --stamp params.checked

DVC deletes a stage's outputs just before it runs the stage, so `dvc exp run -S lora.r=0` would lose the
adapters before the train stage reads its params. This stage reads every param (DVC reruns it on any
change) and sits upstream of every other one (fetch depends on its stamp), so DVC stops here first. The
stamp's content never changes, so a passing check reruns nothing downstream.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.io import atomic_file, run_stage

STAMP = "params.yaml passed python -m lorapipe.config (stages/validate.py)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--stamp", type=Path, required=True, help="written when the params are valid")
    args = parser.parse_args()

    def body() -> None:
        load_params(args.params)
        with atomic_file(args.stamp) as staging:
            staging.write_text(STAMP, encoding="utf-8")

    run_stage("validate", body)


if __name__ == "__main__":
    main()

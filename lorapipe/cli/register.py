"""Register the adapters of the current commit as a version in DVC's model registry (GTO Git tags).

python -m lorapipe.cli.register --version v1.0.0 [--stage prod] [--push]
    then elsewhere: dvc artifacts get <repo-url> sentiment-adapter --rev v1.0.0
                    dvc artifacts get <repo-url> sentiment-adapter --stage prod;  gto show (in a clone)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.io import run_stage
from lorapipe.release.versions import register_adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", required=True, help="semantic version with a leading v: v1.0.0")
    parser.add_argument("--stage", help="also assign this stage (prod, staging, ...)")
    parser.add_argument("--push", action="store_true", help="push the tags to origin and the adapters to DVC")
    parser.add_argument("--repo", type=Path, default=Path("."))
    args = parser.parse_args()
    run_stage("register", lambda: register_adapters(args.repo.resolve(), args.version, args.stage, args.push))


if __name__ == "__main__":
    main()

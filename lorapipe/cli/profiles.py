"""Switch params.yaml to a profile from profiles/: ``python -m lorapipe.cli.profiles study-a-mistral-7b``."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.errors import PipelineError

PROFILES = Path("profiles")


def use_profile(name: str, profiles: Path = PROFILES, params: Path = Path("params.yaml")) -> Path:
    """Validate ``profiles/<name>.yaml`` and copy it over ``params``."""
    source = profiles / f"{name}.yaml"
    if not source.exists():
        known = ", ".join(sorted(p.stem for p in profiles.glob("*.yaml")))
        raise PipelineError(f"{source}: no such profile (known: {known})")
    load_params(source)
    shutil.copyfile(source, params)
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a file name in profiles/ without .yaml")
    args = parser.parse_args()
    try:
        source = use_profile(args.name)
    except PipelineError as err:
        sys.exit(f"error: {err}")
    print(f"params.yaml is now {source}; run `dvc exp run` (or `dvc repro`) to build it")


if __name__ == "__main__":
    main()

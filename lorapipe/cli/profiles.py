"""Switch params.yaml to a profile from profiles/: ``python -m lorapipe.cli.profiles study-a-mistral-7b``."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from lorapipe.config import load_params
from lorapipe.errors import PipelineError

PROFILES = Path("profiles")


def use_profile(name: str, profiles: Path = PROFILES, params: Path = Path("params.yaml")) -> Path:
    """Validate ``profiles/<name>.yaml`` and copy it over ``params``."""
    source = profiles / f"{name}.yaml"
    known = ", ".join(sorted(p.stem for p in profiles.glob("*.yaml")))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise PipelineError(f"{name}: not a profile name (a file name in {profiles}/ without .yaml; known: {known})")
    if not source.exists():
        raise PipelineError(f"{source}: no such profile (known: {known})")
    load_params(source)
    try:
        shutil.copyfile(source, params)
    except OSError as err:
        raise PipelineError(f"{params}: cannot write it: {err.strerror}") from None
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

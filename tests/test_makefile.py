"""The Makefile hands user values (VERSION, STAGE, PROFILE, STORAGE, ENGINE, SWEEP) to its commands as data, never as
shell code."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

RECORDER = (
    '#!/bin/sh\nfor arg in "$@"; do printf "%s\\n" "$arg"; done > "$(dirname "$0")/../../args-$(basename "$0")"\n'
)


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """The Makefile with a set-up environment whose python and dvc only record the arguments they get."""
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "dvc"):
        (bin_dir / tool).write_text(RECORDER)
        (bin_dir / tool).chmod(0o755)
    installed = tmp_path / ".venv" / ".installed"
    installed.touch()
    os.utime(installed, (2**31, 2**31))  # newer than the requirements: setup has nothing to do
    return tmp_path


@pytest.mark.parametrize(
    ("target", "variable", "tool"),
    [("register", "VERSION", "python"), ("register", "STAGE", "python"), ("profile", "PROFILE", "python"),
     ("remote", "STORAGE", "dvc"), ("sweep", "ENGINE", "python")],
)  # fmt: skip
def test_a_value_with_shell_code_reaches_the_command_as_one_argument(workspace, target, variable, tool):
    # ``$(...)`` is make's own syntax (make expands it to a variable's value, running nothing), so it is left out.
    value = "v3.0.0; touch INJECTED `touch INJECTED2` && touch INJECTED3 | cat > INJECTED4 \"'"
    values = {"VERSION": "v1.0.0", variable: value}
    done = subprocess.run(
        ["make", "-s", target, *(f"{k}={v}" for k, v in values.items())],
        cwd=workspace,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not list(workspace.glob("INJECTED*")), "a value ran as shell code"
    assert value in (workspace / f"args-{tool}").read_text().splitlines()


def test_sweep_options_are_split_into_words_and_never_run(workspace):
    value = "-S lora.r=4,8 -S 'x=1;touch INJECTED' `touch INJECTED2` * ;touch INJECTED3"
    done = subprocess.run(
        ["make", "-s", "sweep", f"SWEEP={value}"], cwd=workspace, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert not list(workspace.glob("INJECTED*")), "a value ran as shell code"
    args = (workspace / "args-python").read_text().splitlines()
    assert args[args.index("--engine") + 1] == "queue"
    assert args[args.index("queue") + 1 :] == value.split()

"""The DVC pipeline end to end on a tiny profile, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, build_tiny_model, tiny_params, write_instructions_json, write_tweets_csv

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC copy of the project's tracked files with a tiny profile as params.yaml."""
    tmp = tmp_path_factory.mktemp("pipeline")
    work = tmp / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if name in ("dvc.lock",) or not (ROOT / name).exists():
            continue
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, work / name)
    model = build_tiny_model(tmp / "tiny-model")
    params = tiny_params(model, write_tweets_csv(tmp / "tweets.csv"), write_instructions_json(tmp / "instr.json"))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "tiny profile"], work)
    return work


def test_dvc_repro_mix_builds_the_data_stages(repo):
    output = run(["dvc", "repro", "mix"], repo)
    assert stages_run(output) == {"fetch", "instructify", "mix"}
    stats = json.loads((repo / "data" / "mixed" / "stats.json").read_text())
    assert stats == {"size": 20, "sentiment": 15, "instructions": 5, "instruction_share": 0.25,
                     "labels": stats["labels"]}
    ignored = run(["git", "status", "--porcelain", "--ignored"], repo)
    assert "data/raw" in ignored and "models/base" in ignored

"""The GPU study script's CPU mode: study A's profile, every stage of the DAG, on a tiny random Mistral."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_study_a_dag_runs_every_stage_on_local_stand_ins_and_records_each(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_study import STAGES

    out = tmp_path / "study.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_study.py"), "--cpu", "--out", str(out), "--examples", "16"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["stages"]) == STAGES and result["report"]
    assert all(stage["seconds"] > 0 for stage in result["stages"].values())
    for name in ("train_sentiment", "train_mixed"):
        train = result["stages"][name]
        assert train["device"] == "cpu" and train["tokens_per_second"] > 0 and train["examples"] > 0
    for stage, models in (("eval_base", ["base"]), ("eval_all", ["sentiment", "mixed"])):
        for model in models:
            assert result["stages"][stage][model]["speed"]["sentiment_examples_per_second"] > 0
    params = (tmp_path / "study-work" / "repo" / "params.yaml").read_text()
    assert "feeling" in params and "tweets.parquet" in params  # study A's columns, from the local stand-in

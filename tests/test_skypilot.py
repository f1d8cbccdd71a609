"""SkyPilot task files (configs/skypilot/), each read by SkyPilot's own parser as `sky launch` and `sky jobs launch`
read them: schema, commands, resources, node count, and that every variable the commands use is declared or set by
SkyPilot. SkyPilot cannot share the pipeline's environment (it pins click < 8.2, huggingface-hub needs >= 8.4.2), so
`make test` gives the path of its own environment's Python in SKYPILOT_PYTHON (.venv-sky, made by the Makefile) and
tests/skypilot_tasks.py parses the files there, with every socket connection refused: nothing is launched and no
cloud is reached.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from lorapipe.cli import experiment

ROOT = Path(__file__).resolve().parents[1]
SKYPILOT = ROOT / "configs" / "skypilot"
FILES = {"experiment.yaml": 1, "sweep.yaml": 1, "two_nodes.yaml": 2}  # file: num_nodes
# What docs/skypilot.md has users pass: the envs the files leave null.
ENVS = [("GIT_URL", "https://example.com/lorapipe.git"), ("COMMIT", "0123abc"), ("DVC_REMOTE_URL", "s3://bucket/x")]
ENVS += [("NAME", "lora-r16"), ("PARAMS", "-S lora.r=16")]
BASH_VARS = {"HOME", "SECONDS"}
SKY_PYTHON = Path(os.environ.get("SKYPILOT_PYTHON", ROOT / ".venv-sky" / "bin" / "python"))


@functools.cache
def parsed(bad: str | None = None) -> dict:
    """What SkyPilot 0.14.1 makes of every file (and of ``bad``, a broken copy), from its own environment."""
    assert SKY_PYTHON.is_file(), f"{SKY_PYTHON}: no SkyPilot environment; `make test` makes it (.venv-sky)"
    command = [str(SKY_PYTHON), str(ROOT / "tests" / "skypilot_tasks.py"), str(SKYPILOT), json.dumps(ENVS)]
    done = subprocess.run([*command, *([bad] if bad else [])], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout)
    assert facts["version"] == "0.14.1" and set(facts["tasks"]) == set(FILES)
    return facts


def load(name: str) -> dict:
    return parsed()["tasks"][name]


def commands(script: str) -> str:
    """The script without its comments."""
    return re.sub(r"(^|\s)#.*$", "", script, flags=re.M)


def runner_options(script: str) -> set[str]:
    """The options the script gives lorapipe.cli.experiment (or two_nodes.yaml's shell function wrapping it)."""
    calls = re.findall(r"(?:lorapipe\.cli\.experiment|^\s*experiment) (?:.*\\\n)*.*", commands(script), re.M)
    return {option for call in calls for option in re.findall(r"(?<!\S)--[a-z][a-z-]*", call)}


def runner_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        experiment.main(["--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("name", FILES)
def test_task_installs_the_project_and_runs_the_runner(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    task = load(name)
    assert task["num_nodes"] == FILES[name]
    assert task["workdir"] == "."  # the checkout is uploaded; setup installs from it
    setup, run = commands(task["setup"]), commands(task["run"])
    assert "venv" in setup and "source ~/lorapipe-venv/bin/activate" in setup
    assert "pip install -r requirements.txt" in setup and "pip install -e '.[cuda,s3,gcs]'" in setup
    assert "source ~/lorapipe-venv/bin/activate" in run and "python -m lorapipe.cli.experiment" in run
    options = runner_options(task["run"])
    assert {"--git-url", "--commit", "--dvc-remote", "--dvc-remote-url", "--name"} <= options
    assert options <= set(re.findall(r"--[a-z][a-z-]*", runner_help(capsys)))  # the runner accepts each of them
    assert "$PARAMS" in run and "accelerate launch" not in run  # the train stage launches its processes
    assert task["envs"]["PARAMS"] == "-S lora.r=16" and "HF_TOKEN" in task["secrets"]


@pytest.mark.parametrize("name", FILES)
def test_every_variable_is_declared_or_set_by_skypilot(name: str) -> None:
    task = load(name)
    script = commands(task["setup"] + "\n" + task["run"])
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", script))
    assigned = set(re.findall(r"^\s*([A-Za-z_]\w*)=", script, re.M))
    skypilot_vars = set(parsed()["node_vars"])  # as SkyPilot's source spells them
    assert used - set(task["envs"]) - set(task["secrets"]) - assigned - skypilot_vars - BASH_VARS == set()


@pytest.mark.parametrize("name", FILES)
def test_required_envs_must_be_given(name: str) -> None:
    task = load(name)
    assert "Environment variable 'GIT_URL' is None" in task["without_envs"]
    # `--secret HF_TOKEN` reaches the node as a secret; without it the token is empty.
    assert task["secrets"]["HF_TOKEN"] == "" and task["token_given"] == "hf_x"


def test_one_experiment_asks_one_on_demand_gpu() -> None:
    resources = load("experiment.yaml")["resources"]
    assert resources and all(list(r["accelerators"].values()) == [1] and not r["use_spot"] for r in resources)


def test_sweep_jobs_take_spot_and_fall_back_to_on_demand() -> None:
    resources = load("sweep.yaml")["resources"]
    by_gpu: dict[str, set[bool]] = {}
    for r in resources:
        assert list(r["accelerators"].values()) == [1]
        by_gpu.setdefault(next(iter(r["accelerators"])), set()).add(r["use_spot"])
        assert r["job_recovery"] == {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 1}
    assert by_gpu and all(spot == {True, False} for spot in by_gpu.values())


def test_two_nodes_join_one_ray_cluster_and_rank_0_runs_the_experiment() -> None:
    task = load("two_nodes.yaml")
    (resources,) = task["resources"]
    assert resources["accelerators"] == {"A100": 1}
    run = commands(task["run"])
    assert 'if [ "$SKYPILOT_NODE_RANK" = 0 ]' in run
    head, others = run.split('if [ "$SKYPILOT_NODE_RANK" = 0 ]')[1].split("\nelse\n")
    assert "ray start --head --port 6379" in head and 'ray start --address "$RAY_HEAD"' in others
    assert 'HEAD_IP=$(echo "$SKYPILOT_NODE_IPS" | head -n1)' in run and 'RAY_HEAD="$HEAD_IP:6379"' in run
    assert 'experiment --ray-address "$RAY_HEAD" -S train.machines="$SKYPILOT_NUM_NODES"' in head
    assert "-S train.processes=$((SKYPILOT_NUM_NODES * SKYPILOT_NUM_GPUS_PER_NODE))" in head
    assert "experiment --prepare-only" in others and "--ray-address" not in others
    assert '--workdir "$HOME/lorapipe-runs/$NAME"' in run  # one clone path on every node
    # Not `ray stop` (it would stop SkyPilot's own Ray, which runs the job) nor `--block` (exits 1 when the head stops).
    assert "~/sky_templates/ray/stop_cluster" in head and "ray stop" not in run and "--block" not in run
    assert "ray==" in task["setup"]


def test_a_misspelt_key_is_refused(tmp_path: Path) -> None:
    text = (SKYPILOT / "two_nodes.yaml").read_text()
    assert "\nnum_nodes: 2\n" in text
    bad = tmp_path / "two_nodes.yaml"
    bad.write_text(text.replace("\nnum_nodes: 2\n", "\nnum_node: 2\n"))
    assert "Instead of 'num_node', did you mean 'num_nodes'" in parsed(str(bad))["bad_file"]

"""A sweep on a real local Ray cluster (a head and two worker nodes on this machine) against DVC's own queue.

The tiny profile, a bare Git remote and a local DVC remote: three experiments run as Ray tasks (each a fresh clone,
`dvc exp run --pull`, `dvc exp push`), pulled back to the head, and equal to the same three run by `dvc exp run`
through the queue engine. The data stages come from the run-cache on the workers; one worker process is killed
mid-experiment and its experiment is retried with the same result.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

from conftest import (
    build_tiny_model,
    copy_tracked_files,
    local_ray_cluster,
    tiny_params,
    write_instructions_json,
    write_tweets_csv,
)
from lorapipe.cluster.grid import expand

pytestmark = pytest.mark.slow

RANKS = (2, 4, 8)
KILLED = "ray-lora.r-4"
QUALITY = re.compile(r"\.(score|generate)\.(accuracy|f1|precision|recall)$|^instructions\.")


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=1500)
    if check:
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Path:
    """The tiny profile committed, pushed to a bare Git remote, its data stages run and a local DVC remote."""
    tmp = tmp_path_factory.mktemp("sweep")
    os.environ.update(
        HF_HUB_OFFLINE="1",
        LORAPIPE_THREADS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@localhost",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@localhost",
    )
    work = copy_tracked_files(tmp / "head")
    model = build_tiny_model(tmp / "tiny-model")
    params = tiny_params(model, write_tweets_csv(tmp / "tweets.csv"), write_instructions_json(tmp / "instr.json"))
    params["train"].update(save_steps=2)  # checkpoints early, so a killed attempt has some to leave behind
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "--bare", str(tmp / "remote.git")], tmp)
    run(["git", "init", "-q", "-b", "main"], work)
    run(["dvc", "remote", "add", "-d", "storage", str(tmp / "dvc-storage")], work)
    # The data stages run here once; their results reach the workers through the run-cache the sweep pushes
    # (dvc.lock stays out of the commit, so only the run-cache can spare the workers from running them).
    run(["dvc", "repro", "mix"], work)
    run(["git", "add", "-A"], work)
    run(["git", "reset", "-q", "dvc.lock"], work)
    run(["git", "commit", "-qm", "tiny profile"], work)
    run(["git", "remote", "add", "origin", str(tmp / "remote.git")], work)
    run(["git", "push", "-q", "origin", "main"], work)
    return work


def sweep(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    ranks = ",".join(map(str, RANKS))
    return run([sys.executable, "-m", "lorapipe.cli.sweep", "-S", f"lora.r={ranks}", *args], work, check=check)


def quality(work: Path, name: str) -> dict[str, float]:
    """The experiment's quality metrics (not its timings) as `dvc exp show` lists them."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], work).stdout)
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            if exp["name"] == name:
                data = exp["revs"][0]["data"]
                assert data["rev"] and "metrics" in data, exp
                return {
                    f"{file}:{key}": value
                    for file, metrics in data["metrics"].items()
                    for key, value in flatten(metrics["data"]).items()
                    if QUALITY.search(key)
                }
    raise AssertionError(f"{name} not in dvc exp show")


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def kill_worker_running(name: str, stop: threading.Event) -> int:
    """SIGKILL the Ray worker process whose experiment ``name`` has reached training; its pid (0: it never did)."""
    while not stop.is_set():
        if training(name):
            for tether in tether_processes(name):
                worker = parent_of(tether)
                if worker and Path(f"/proc/{worker}/cmdline").read_bytes().startswith(b"ray::"):
                    os.kill(worker, signal.SIGKILL)
                    return worker
        stop.wait(0.5)
    return 0


def tether_processes(name: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lorapipe.tether" in args and b"exp" in args and name.encode() in args:
            found.append(int(cmdline.parent.name))
    return found


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def training(name: str) -> bool:
    """Whether an attempt at ``name`` has a train stage running (its clone's folder is named for it)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes()
            cwd = os.readlink(cmdline.parent / "cwd")
        except OSError:
            continue
        if b"stages/train.py" in args and f"lorapipe-{name}-" in cwd:
            return True
    return False


def test_sweep_refuses_a_commit_not_on_the_git_remote(head):
    (head / "README.md").write_text("local edit\n")
    run(["git", "commit", "-qam", "not pushed"], head)
    try:
        done = sweep(head, "--engine", "ray", "--address", "127.0.0.1:1", check=False)
        assert done.returncode == 1 and "is not on" in done.stderr and "git push origin" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    finally:
        run(["git", "reset", "-q", "--hard", "HEAD~1"], head)
    done = sweep(head, "--engine", "ray", "--dvc-remote", "nowhere", check=False)
    assert done.returncode == 1 and "--dvc-remote nowhere: no such DVC remote (configured: storage" in done.stderr


def test_three_experiments_on_a_local_ray_cluster_equal_dvc_exp_run_and_survive_a_killed_worker(head):
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=lambda: killed.append(kill_worker_running(KILLED, stop)), daemon=True)
    with local_ray_cluster(head_cpus=0, worker_cpus=[1, 1]) as address:
        killer.start()
        try:
            done = sweep(head, "--engine", "ray", "--address", address, "--name-prefix", "ray")
        finally:
            stop.set()
            killer.join()
            # The killed attempt died before it could remove its clone and log (the runner removes its own).
            for left in Path(tempfile.gettempdir()).glob(f"lorapipe-{KILLED}-*"):
                shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink(missing_ok=True)
    assert killed and killed[0], f"{KILLED} never reached training"
    names = [point.name for point in expand([f"lora.r={','.join(map(str, RANKS))}"], "ray")]
    for name in names:
        log = (head / "sweep-logs" / f"{name}.log").read_text()
        # The data stages came from the run-cache the head pushed; training ran.
        for stage in ("fetch", "instructify", "mix"):
            assert f"Stage '{stage}' is cached - skipping run" in log, (name, stage, log[-3000:])
            assert f"Running stage '{stage}'" not in log
        assert "Running stage 'train_sentiment'" in log
    assert f"{KILLED}: done" in done.stderr

    local = sweep(head, "--engine", "queue", "--name-prefix", "local")
    assert local.returncode == 0
    for rank in RANKS:
        on_ray, alone = quality(head, f"ray-lora.r-{rank}"), quality(head, f"local-lora.r-{rank}")
        assert on_ray and on_ray == alone, rank

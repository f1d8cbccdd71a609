"""A sweep's checks and DVC's own queue engine; the Ray engine is ``lorapipe.cluster.ray_sweep``.

Before anything runs elsewhere: the commit must be on the Git remote (a worker clones it from there), the DVC
remote must be configured, and no tracked file may hold uncommitted changes (a worker would run without them).
The baseline's outputs and run-cache are then pushed, so the stages a grid point does not change are pulled
by the workers, not recomputed.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path

from lorapipe.cluster.experiment import command_env
from lorapipe.cluster.grid import GridPoint
from lorapipe.errors import PipelineError

log = logging.getLogger(__name__)

QUEUE_POLL_SECONDS = 5


def run(command: list[str], root: Path, what: str) -> str:
    """A git or dvc command in ``root``; its output, or one line saying what failed."""
    done = subprocess.run(command, cwd=root, env=command_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise PipelineError(f"{what}: {message[-1] if message else 'failed'}")
    return done.stdout


def head_commit(root: Path) -> str:
    return run(["git", "rev-parse", "HEAD"], root, "git rev-parse HEAD").strip()


def check_clean(root: Path) -> None:
    changed = run(["git", "status", "--porcelain", "--untracked-files=no"], root, "git status").split("\n")
    names = [line[3:] for line in changed if line.strip()]
    if names:
        shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        raise PipelineError(f"uncommitted changes to {shown}: commit and push them; the sweep runs the commit")


def check_commit_on_remote(root: Path, git_remote: str, commit: str) -> str:
    """The remote's URL, once some branch or tag there holds ``commit``; one line otherwise."""
    url = run(["git", "remote", "get-url", git_remote], root, f"--git-remote {git_remote}").strip()
    listed = run(["git", "ls-remote", git_remote], root, f"--git-remote {git_remote}: git ls-remote")
    heads = {line.split()[0] for line in listed.splitlines() if line.strip()}
    for sha in heads:
        is_ancestor = subprocess.run(
            ["git", "merge-base", "--is-ancestor", commit, sha], cwd=root, capture_output=True, check=False
        )
        if is_ancestor.returncode == 0:
            return url
    raise PipelineError(
        f"--git-remote {git_remote}: commit {commit[:12]} is not on {url}; `git push {git_remote}` it first"
    )


def default_dvc_remote(root: Path) -> str:
    name = subprocess.run(
        ["dvc", "config", "core.remote"], cwd=root, env=command_env(), capture_output=True, text=True, check=False
    ).stdout.strip()
    if not name:
        raise PipelineError("--dvc-remote: none given and no default DVC remote (`dvc remote add -d NAME URL`)")
    return name


def push_baseline(root: Path, dvc_remote: str) -> None:
    """The commit's outputs and run-cache entries to the DVC remote, for the workers' ``--pull``."""
    log.info("pushing the baseline's outputs and run-cache to %s", dvc_remote)
    run(["dvc", "push", "--run-cache", "--remote", dvc_remote], root, f"dvc push --run-cache -r {dvc_remote}")


def queue_sweep(root: Path, points: list[GridPoint], jobs: int) -> dict[str, str]:
    """Each point queued with ``dvc exp run --queue`` and the queue started with ``jobs`` workers; waits for the
    queue and returns each experiment's state (Success, Failed, ...) as ``dvc queue status`` says."""
    for point in points:
        run(["dvc", "exp", "run", "--queue", "--name", point.name, *point.set_params()], root, point.name)
    run(["dvc", "queue", "start", "--jobs", str(jobs)], root, "dvc queue start")
    names = {point.name for point in points}
    while True:
        states = queue_states(run(["dvc", "queue", "status"], root, "dvc queue status"), names)
        if all(state not in ("Queued", "Running") for state in states.values()):
            return states
        time.sleep(QUEUE_POLL_SECONDS)


def queue_states(status: str, names: set[str]) -> dict[str, str]:
    """Each named experiment's state in ``dvc queue status``'s table (rows: task, name, created, status)."""
    states = dict.fromkeys(names, "Queued")
    for line in status.splitlines():
        cells = line.split()
        for name in names & set(cells):
            found = re.search(r"\b(Queued|Running|Success|Failed)\b", line)
            if found:
                states[name] = found.group(1)
    return states

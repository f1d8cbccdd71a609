"""One experiment on any machine: a fresh clone of a pushed commit, ``dvc exp run --pull``, ``dvc exp push``.

The same steps serve a Ray task (``lorapipe.cluster.ray_sweep``) and a SkyPilot job (``configs/skypilot/``,
through ``python -m lorapipe.cli.experiment``). The unchanged stages come from the DVC remote (``--pull`` fetches
their outputs and run-cache entries instead of recomputing them). Only a finished experiment is pushed: a run
that fails, or whose machine dies, pushes nothing, so a retry starts from the same commit and state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorapipe.errors import PipelineError
from lorapipe.tether import run_tethered

DATA_STAGES = ("fetch", "instructify", "mix")


@dataclass(frozen=True)
class ExperimentSpec:
    """Where the commit and the data live, and what to run: enough for a machine that has only the package."""

    git_url: str
    commit: str
    name: str
    set_params: list[str] = field(default_factory=list)  # ["-S", "lora.r=8", ...]
    dvc_remote: str = "storage"
    dvc_remote_url: str = ""
    dvc_remote_options: dict[str, str] = field(default_factory=dict)  # endpointurl, region, ... (no secrets)
    workdir: str = ""  # where to clone; empty: a new temporary folder


@dataclass
class ExperimentResult:
    name: str
    ok: bool
    workdir: str
    log: str  # the log file's path on the machine that ran it
    output: str  # the log's text (the head keeps a copy)
    error: str = ""
    attempt_pid: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def command_env(code: Path | None = None) -> dict[str, str]:
    """The stages' commands (``python stages/...``) find this interpreter's environment first on PATH, and the
    package from ``code`` (the clone at the commit) before any installed copy, so the code DVC records is the code
    that ran."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    # DVC commits the experiment; a fresh machine may have no Git identity.
    for role in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{role}_NAME", "lorapipe sweep")
        env.setdefault(f"GIT_{role}_EMAIL", "sweep@localhost")
    return env


def clone(spec: ExperimentSpec, log: Path) -> Path:
    """The commit, checked out in a fresh folder, with the DVC remote configured (``--local``: not committed)."""
    work = Path(spec.workdir) if spec.workdir else Path(tempfile.mkdtemp(prefix=f"lorapipe-{spec.name}-"))
    if work.exists() and any(work.iterdir()):
        raise PipelineError(f"{work}: the experiment's folder is not empty (--workdir)")
    env = command_env()
    steps = [
        ["git", "clone", "--quiet", "--no-checkout", spec.git_url, str(work)],
        ["git", "-C", str(work), "checkout", "--quiet", "--detach", spec.commit],
    ]
    if spec.dvc_remote_url:
        steps.append(["dvc", "remote", "add", "--local", "--force", "--default", spec.dvc_remote, spec.dvc_remote_url])
        steps += [
            ["dvc", "remote", "modify", "--local", spec.dvc_remote, k, v] for k, v in spec.dvc_remote_options.items()
        ]
    for step in steps:
        if run_tethered(step, work if step[0] == "dvc" else Path.cwd(), env, log) != 0:
            raise PipelineError(f"{spec.name}: `{' '.join(step)}` failed (log: {log})")
    return work


def run_experiment(spec: ExperimentSpec, prepare_only: bool = False) -> ExperimentResult:
    """Clone, run and push one experiment (or, with ``prepare_only``, clone and pull the data stages' outputs)."""
    log = Path(tempfile.gettempdir()) / f"lorapipe-{spec.name}-{os.getpid()}.log"
    result = ExperimentResult(spec.name, False, spec.workdir, str(log), "", attempt_pid=os.getpid())
    try:
        work = clone(spec, log)
        result.workdir = str(work)
        if prepare_only:
            steps = [["dvc", "repro", "--pull", *DATA_STAGES]]
        else:
            steps = [
                ["dvc", "exp", "run", "--pull", "--name", spec.name, *spec.set_params],
                ["dvc", "exp", "push", "--force", "--run-cache", "--remote", spec.dvc_remote, "origin", spec.name],
            ]
        for step in steps:
            if run_tethered(step, work, command_env(work), log) != 0:
                raise PipelineError(f"{spec.name}: `{' '.join(step[:3])}` failed: {last_error(log)}")
        result.ok = True
    except PipelineError as err:
        result.error = str(err)
    result.output = log.read_text(errors="replace") if log.is_file() else ""
    if not spec.workdir and not prepare_only:  # a temporary clone: its result is pushed, its log returned
        shutil.rmtree(result.workdir, ignore_errors=True)
        log.unlink(missing_ok=True)
    return result


def last_error(log: Path) -> str:
    """The log's last line that reads like an error (DVC's 'ERROR: ...', a stage's 'failed: ...'), else its last."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "failed" in line or "Error" in line]
    return (errors or lines or ["(no output)"])[-1][:500]


def dvc_remote(root: Path, name: str) -> tuple[str, dict[str, str]]:
    """The URL and options of the DVC remote ``name`` as configured here (committed or ``--local``), without the
    options that hold credentials: each machine reads its own (environment, credential files). One line when
    there is no such remote."""
    listed = subprocess.run(["dvc", "config", "--list"], cwd=root, capture_output=True, text=True, check=False)
    prefix = f"remote.{name}."
    options = dict(
        line[len(prefix) :].split("=", 1)
        for line in listed.stdout.splitlines()
        if line.startswith(prefix) and "=" in line
    )
    if "url" not in options:
        known = sorted({line.split(".")[1] for line in listed.stdout.splitlines() if line.startswith("remote.")})
        raise PipelineError(
            f"--dvc-remote {name}: no such DVC remote (configured: {', '.join(known) or 'none'}; `dvc remote add`)"
        )
    url = options.pop("url")
    # A remote in a local folder, given relative to .dvc/, must reach the clone as an absolute path.
    if "://" not in url and not Path(url).is_absolute():
        url = str((root / ".dvc" / url).resolve())
    secret = ("key", "secret", "password", "token", "credential")
    return url, {k: v for k, v in options.items() if not any(word in k for word in secret)}


def print_result(result: ExperimentResult) -> None:
    print(json.dumps({k: v for k, v in result.to_json().items() if k != "output"}))

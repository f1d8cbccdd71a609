"""The Ray engine: one Ray task per grid point, on any node of the cluster, then every result pulled to the head.

Each task runs ``lorapipe.cluster.experiment.run_experiment`` (a fresh clone of the pushed commit, ``dvc exp run
--pull``, ``dvc exp push``) with the CPUs and GPUs one experiment needs. A task whose worker process or node dies
is retried by Ray (``max_retries``) on whatever node is free; the dead attempt's commands die with it (the tether)
and it pushed nothing, since pushing is its last step. An experiment that fails on its own (a bad value, a stage
error) is not retried: it is reported with its error and the others go on.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from lorapipe.cluster.experiment import ExperimentResult, ExperimentSpec, run_experiment
from lorapipe.cluster.grid import GridPoint
from lorapipe.cluster.sweep import run
from lorapipe.training.machines import connect

log = logging.getLogger(__name__)


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """The Ray task's body (module level, so workers import it rather than unpickle code)."""
    return run_experiment(ExperimentSpec(**spec)).to_json()


def resources(ray: Any, cpus: float | None, gpus: float | None, processes: int) -> tuple[float, float]:
    """CPUs and GPUs one experiment asks for: a GPU per training process where the cluster has GPUs, else a CPU
    per process; ``--cpus``/``--gpus`` override."""
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    gpus = gpus if gpus is not None else (processes if has_gpus else 0)
    cpus = cpus if cpus is not None else (1 if gpus else processes)
    return cpus, gpus


def ray_sweep(
    points: list[GridPoint],
    base: ExperimentSpec,
    address: str,
    processes: int,
    cpus: float | None = None,
    gpus: float | None = None,
    retries: int = 2,
) -> list[ExperimentResult]:
    """Every point run as a Ray task; results in the order they finish (failed ones included)."""
    ray = connect(address, f"--engine ray --address {address}")
    try:
        num_cpus, num_gpus = resources(ray, cpus, gpus, processes)
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=retries, retry_exceptions=False)(run_point)
        log.info("%d experiments on Ray (%s CPU, %s GPU each, %d retries)", len(points), num_cpus, num_gpus, retries)
        pending = {
            task.options(name=f"lorapipe:{point.name}").remote(
                asdict(replace(base, name=point.name, set_params=point.set_params()))
            ): point
            for point in points
        }
        results = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            point = pending.pop(done[0])
            try:
                result = ExperimentResult(**ray.get(done[0]))
            except Exception as err:  # a task that died more often than it may be retried, or Ray's own failure
                result = ExperimentResult(point.name, False, "", "", "", error=str(err).splitlines()[0][:500])
            log.info("%s: %s", point.name, "done" if result.ok else f"FAILED: {result.error}")
            results.append(result)
        return results
    finally:
        ray.shutdown()


def pull_results(root: Path, git_remote: str, dvc_remote: str, results: list[ExperimentResult]) -> None:
    """Each finished experiment's Git ref and outputs, from the remotes into this repository."""
    for result in results:
        if result.ok:
            run(["dvc", "exp", "pull", "--force", "--remote", dvc_remote, git_remote, result.name], root, result.name)

"""A sweep over params: every combination of the -S values, one DVC experiment each, on DVC's queue or a Ray cluster.

  python -m lorapipe.cli.sweep -S lora.r=4,8,16 -S train.learning_rate=1e-3,2e-3            # DVC's queue, here
  python -m lorapipe.cli.sweep -S lora.r=4,8,16 --engine ray --address auto --git-remote origin --dvc-remote storage

engines:
  queue  `dvc exp run --queue` for each experiment, then `dvc queue start --jobs N`, on this machine; waits for it.
  ray    one Ray task per experiment on any node of the cluster at --address (`ray start --head` / `ray start
         --address HEAD:6379` on the others): each clones the commit from --git-remote, runs `dvc exp run --pull`
         (unchanged stages come from the DVC remote's cache and run-cache) and `dvc exp push`es; then every result is
         pulled here. The commit must be on the Git remote and the DVC remote configured; a task whose worker or node
         dies is retried elsewhere (--retries); a failed experiment is reported and the others go on.

Afterwards: `dvc exp show`, `dvc metrics diff`, `dvc exp apply NAME`. Exit status 1 when any experiment failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lorapipe.cluster.experiment import ExperimentSpec, dvc_remote
from lorapipe.cluster.grid import expand
from lorapipe.cluster.sweep import (
    check_clean,
    check_commit_on_remote,
    default_dvc_remote,
    head_commit,
    push_baseline,
    queue_sweep,
)
from lorapipe.config import load_params
from lorapipe.errors import PipelineError
from lorapipe.io import setup_logging

log = logging.getLogger("lorapipe.sweep")


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="python -m lorapipe.cli.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_argument(
        "-S",
        "--set-param",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a param and its values, comma-separated (DVC's -S syntax); repeat for a grid",
    )
    cli.add_argument("--engine", choices=("queue", "ray"), default="queue", help="where the experiments run")
    cli.add_argument("--name-prefix", default="sweep", help="experiment names: PREFIX-key-value-...")
    cli.add_argument("--jobs", type=int, default=1, help="queue: experiments run at once on this machine")
    cli.add_argument("--address", default="auto", help="ray: the cluster (auto: the one `ray start` joined here)")
    cli.add_argument("--git-remote", default="origin", help="ray: the Git remote the workers clone the commit from")
    cli.add_argument("--dvc-remote", help="ray: the DVC remote for data and results (default: DVC's default)")
    cli.add_argument("--cpus", type=float, help="ray: CPUs per experiment (default: one per training process)")
    cli.add_argument("--gpus", type=float, help="ray: GPUs per experiment (default: one per process if any)")
    cli.add_argument("--retries", type=int, default=2, help="ray: retries of an experiment whose worker or node dies")
    cli.add_argument("--repo", type=Path, default=Path("."), help="the repository (default: here)")
    return cli


def sweep(args: argparse.Namespace) -> bool:
    """Run the sweep; whether every experiment finished."""
    root = args.repo.resolve()
    points = expand(args.options, args.name_prefix)
    params = load_params(root / "params.yaml")
    log.info("%d experiments: %s", len(points), ", ".join(point.name for point in points))
    if args.engine == "queue":
        states = queue_sweep(root, points, args.jobs)
        for name, state in states.items():
            log.info("%s: %s", name, state)
        return all(state == "Success" for state in states.values())

    from lorapipe.cluster.ray_sweep import pull_results, ray_sweep

    commit = head_commit(root)
    check_clean(root)
    git_url = check_commit_on_remote(root, args.git_remote, commit)
    remote = args.dvc_remote or default_dvc_remote(root)
    url, options = dvc_remote(root, remote)
    push_baseline(root, remote)
    base = ExperimentSpec(git_url, commit, "", dvc_remote=remote, dvc_remote_url=url, dvc_remote_options=options)
    results = ray_sweep(points, base, args.address, params.train.processes, args.cpus, args.gpus, retries=args.retries)
    logs = root / "sweep-logs"
    logs.mkdir(exist_ok=True)
    for result in results:
        (logs / f"{result.name}.log").write_text(result.output)
    pull_results(root, args.git_remote, remote, results)
    for result in results:
        log.info("%s: %s", result.name, "pulled" if result.ok else f"FAILED: {result.error}")
    log.info("logs in %s; compare with `dvc exp show`", logs)
    return all(result.ok for result in results)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parser().parse_args(argv)
    try:
        finished = sweep(args)
    except PipelineError as err:
        sys.exit(f"error: {err}")
    sys.exit(0 if finished else 1)


if __name__ == "__main__":
    main()

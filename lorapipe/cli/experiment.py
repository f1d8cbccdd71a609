"""One experiment on this machine from a pushed commit: clone, `dvc exp run --pull`, `dvc exp push` (what a Ray
sweep task does; SkyPilot's task files in configs/skypilot/ run it on rented GPUs).

  python -m lorapipe.cli.experiment --git-url URL --commit SHA --name NAME -S lora.r=16 \\
      --dvc-remote storage --dvc-remote-url s3://bucket/path

Prints the result as one JSON line (name, ok, workdir, log, error); exit status 1 when it failed.
"""

from __future__ import annotations

import argparse
import os
import sys

from lorapipe.cluster.experiment import ExperimentSpec, print_result, run_experiment


def main(argv: list[str] | None = None) -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--git-url", required=True, help="the Git remote holding the commit")
    cli.add_argument("--commit", required=True, help="the commit to run (a sha, branch or tag on the remote)")
    cli.add_argument("--name", required=True, help="the experiment's name (dvc exp run --name)")
    cli.add_argument("-S", "--set-param", dest="params", action="append", default=[], metavar="KEY=VALUE")
    cli.add_argument("--dvc-remote", default="storage", help="the DVC remote's name in the clone")
    cli.add_argument("--dvc-remote-url", default="", help="its URL; empty: the remote the commit configures")
    cli.add_argument("--workdir", default="", help="where to clone (must be empty; default: a new temporary folder)")
    cli.add_argument("--ray-address", help="a Ray cluster for train.machines > 1 (sets RAY_ADDRESS for the stages)")
    cli.add_argument("--prepare-only", action="store_true", help="clone and pull the data stages only (other nodes)")
    args = cli.parse_args(argv)
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    spec = ExperimentSpec(
        args.git_url,
        args.commit,
        args.name,
        [option for value in args.params for option in ("-S", value)],
        args.dvc_remote,
        args.dvc_remote_url,
        workdir=os.path.expanduser(args.workdir),
    )
    result = run_experiment(spec, prepare_only=args.prepare_only)
    print_result(result)
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()

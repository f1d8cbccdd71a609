"""What SkyPilot's own parser makes of configs/skypilot/, as JSON: run by tests/test_skypilot.py with the Python of
SkyPilot's environment (.venv-sky: SkyPilot cannot share the pipeline's, see the Makefile), never with lorapipe's.

    python tests/skypilot_tasks.py CONFIG_DIR ENVS_JSON [BAD_YAML]

Every socket connection fails here: parsing must reach no cloud.
"""

from __future__ import annotations

import json
import socket
import sys
import warnings
from pathlib import Path


def refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"a network connection was attempted: {args}")


socket.socket.connect = refuse  # type: ignore[method-assign]
socket.socket.connect_ex = refuse  # type: ignore[method-assign]

with warnings.catch_warnings():  # skypilot 0.14.1 calls SQLAlchemy's moved declarative_base()
    warnings.filterwarnings("ignore", message=r".*declarative_base\(\)")
    import sky
    from sky.skylet import constants
    from sky.utils import dag_utils

NODE_VARS = ("SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_NODES", "SKYPILOT_NUM_GPUS_PER_NODE")


def error_of(work) -> str:
    try:
        work()
    except ValueError as err:
        return str(err)
    return ""


def task_facts(path: Path, envs: list[tuple[str, str]], jobs: bool) -> dict:
    """The task as `sky launch` (and, with ``jobs``, `sky jobs launch`) builds it from the file and --env options."""
    dag = dag_utils.load_chain_dag_from_yaml(str(path), env_overrides=envs)
    if jobs:
        dag_utils.fill_default_config_in_dag_for_job_launch(dag)
    (task,) = dag.tasks
    with_token = dag_utils.load_chain_dag_from_yaml(
        str(path), env_overrides=envs, secret_overrides=[("HF_TOKEN", "hf_x")]
    ).tasks[0]
    return {
        "num_nodes": task.num_nodes,
        "workdir": task.workdir,
        "setup": task.setup,
        "run": task.run,
        "envs": dict(task.envs),
        "secrets": {k: v.get_secret_value() for k, v in task.secrets.items()},
        "token_given": with_token.secrets["HF_TOKEN"].get_secret_value(),
        "resources": [
            {"accelerators": r.accelerators, "use_spot": r.use_spot, "job_recovery": r.job_recovery}
            for r in task.resources
        ],
        "without_envs": error_of(lambda: dag_utils.load_chain_dag_from_yaml(str(path), env_overrides=None)),
    }


def main() -> None:
    folder, envs = Path(sys.argv[1]), [tuple(pair) for pair in json.loads(sys.argv[2])]
    facts = {
        "version": sky.__version__,
        "node_vars": [getattr(constants, name) for name in NODE_VARS],
        "tasks": {p.name: task_facts(p, envs, p.name == "sweep.yaml") for p in sorted(folder.glob("*.yaml"))},
    }
    if len(sys.argv) > 3:
        facts["bad_file"] = error_of(lambda: sky.Task.from_yaml(sys.argv[3]))
    print(json.dumps(facts))


if __name__ == "__main__":
    main()

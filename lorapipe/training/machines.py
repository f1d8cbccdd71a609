"""Training across machines, started by Ray: one ``accelerate launch`` per machine, each with its machine rank.

DVC runs the train stage on one machine (machine 0, the rendezvous: its IP and a free port); through the Ray
cluster at ``RAY_ADDRESS`` the stage starts the launcher of every other machine on a node of its own (Ray's node
affinity), so nobody types a command on each machine. accelerate hands the ranks to torchrun's static rendezvous
(as with ``num_machines`` in an accelerate config). Why Ray rather than typing ``torchrun --rdzv-backend c10d`` on
each machine, or Ray Train: the sweep already runs on Ray, SkyPilot starts Ray on its nodes, and the stage keeps
its one training path (accelerate, with the same configs for DDP, FSDP and ZeRO-3).

Every machine runs the stage script from the repository at the same path (``python -m lorapipe.cli.experiment
--prepare-only`` clones it there). The small inputs (params with the experiment's values, the training and
validation files, the accelerate config) are sent from machine 0; the base model must be there already, and is
compared with machine 0's before any launcher starts: a difference is one line naming the machine and the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from lorapipe.errors import PipelineError
from lorapipe.tether import tethered
from lorapipe.training.launch import accelerate_command

log = logging.getLogger(__name__)

HASHED_BYTES = 64 * 2**20  # larger files are compared by size: hashing a 7B model's shards on every node is minutes


def fingerprint(paths: list[str], root: Path = Path()) -> dict[str, str]:
    """Each input file under ``root`` (a folder's files too) as its sha256, or its size when large; '(missing)'
    when absent. Keys are the names as given, so two machines' fingerprints compare."""
    found: dict[str, str] = {}
    for name in paths:
        path = root / name
        if not path.exists():
            found[name] = "(missing)"
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
        for file in files:
            size = file.stat().st_size
            digest = hashlib.sha256(file.read_bytes()).hexdigest() if size <= HASHED_BYTES else f"{size} bytes"
            found[str(Path(name) / file.relative_to(path)) if path.is_dir() else name] = digest
    return found


def machine_inputs(cwd: str, inputs: list[str]) -> dict[str, str] | str:
    """A Ray task on another machine: the fingerprint of its inputs, or why it has none."""
    if not Path(cwd).is_dir():
        return f"{cwd}: no such folder (the repository must be at one path on every machine)"
    return fingerprint(inputs, Path(cwd))


def machine_launch(command: list[str], cwd: str, shipped: dict[str, bytes]) -> dict[str, Any]:
    """A Ray task on another machine: its launcher, run there, tethered to the task. The small inputs come from
    machine 0 (``shipped``: params with the experiment's values, data files, the accelerate config), written to a
    folder of their own; the command names them there."""
    with tempfile.TemporaryDirectory(prefix="lorapipe-machine-") as folder:
        renamed = {}
        for index, (name, content) in enumerate(shipped.items()):
            renamed[name] = str(Path(folder) / f"{index}-{Path(name).name}")
            Path(renamed[name]).write_bytes(content)
        command = [renamed.get(arg, renamed.get(str(Path(arg)), arg)) for arg in command]
        # The package from the repository there, as the stage on machine 0 runs it, before any installed copy.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [cwd, os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(tethered(command), cwd=cwd, env=env, capture_output=True, text=True, check=False)
    return {"status": done.returncode, "output": (done.stderr or done.stdout)[-3000:]}


def check_inputs(ray: Any, nodes: list[str], inputs: list[str]) -> None:
    """Every machine holds machine 0's inputs, byte for byte; one line naming the first that does not."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    expected = fingerprint(inputs)
    missing = [name for name, digest in expected.items() if digest == "(missing)"]
    if missing:
        raise PipelineError(f"{missing[0]}: no such file or folder on machine 0")
    task = ray.remote(num_cpus=0, max_retries=0)(machine_inputs)
    pinned = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)) for n in nodes]
    found = ray.get([each.remote(os.getcwd(), inputs) for each in pinned])
    for rank, there in enumerate(found, start=1):
        compare_inputs(rank, expected, there)


def compare_inputs(rank: int, expected: dict[str, str], there: dict[str, str] | str) -> None:
    """One line naming the machine and the first input it lacks or holds otherwise than machine 0."""
    if isinstance(there, str):
        raise PipelineError(f"machine {rank}: {there}")
    for name, digest in expected.items():
        if there.get(name) != digest:
            what = "missing" if there.get(name, "(missing)") == "(missing)" else "not the same as on machine 0"
            raise PipelineError(f"machine {rank}: {name} is {what} (pull the data stages there first)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def connect(address: str, user: str) -> Any:
    """The ``ray`` module, connected to the cluster at ``address``; one line naming ``user`` (what asked for the
    cluster) when Ray is not installed or no cluster answers there. The sweep connects through this too."""
    try:
        import ray
    except ImportError as err:
        raise PipelineError(f"{user} needs Ray: pip install -e '.[cluster]'") from err
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PipelineError(f"{user}: no Ray cluster at {address} (`ray start`; {why})") from err
    return ray


def other_nodes(ray: Any, count: int, gpus: int) -> list[str]:
    """``count`` alive nodes other than this one, each with ``gpus`` GPUs; one line when the cluster is short."""
    here = ray.get_runtime_context().get_node_id()
    nodes = [
        node["NodeID"]
        for node in ray.nodes()
        if node["Alive"] and node["NodeID"] != here and node["Resources"].get("GPU", 0) >= gpus
    ]
    if len(nodes) < count:
        raise PipelineError(
            f"train.machines: {count + 1} machines asked; the Ray cluster has {len(nodes)} other node(s)"
            f" with {gpus} GPU(s)"
        )
    return sorted(nodes)[:count]


def relaunch_on_machines(
    config: Path, processes: int, machines: int, script: list[str], shipped: list[str], present: list[str]
) -> int:
    """Run ``script`` in ``processes`` processes over ``machines`` machines (this one is machine 0); exit status.

    ``shipped``: small input files sent from here to every machine; ``present``: inputs every machine must hold
    already, the same as here (the base model)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    address = os.environ.get("RAY_ADDRESS", "auto")
    ray = connect(address, f"train.machines {machines} (RAY_ADDRESS={address})")
    try:
        per_machine = processes // machines
        gpus = per_machine if ray.cluster_resources().get("GPU", 0) else 0
        nodes = other_nodes(ray, machines - 1, gpus)
        ip, port = ray.util.get_node_ip_address(), free_port()
        extra = ["--num_machines", str(machines), "--main_process_ip", ip, "--main_process_port", str(port)]

        def command(rank: int) -> list[str]:
            launch = accelerate_command(config, processes, script)
            at = launch.index("--num_processes")
            return [*launch[:at], *extra, "--machine_rank", str(rank), *launch[at:]]

        check_inputs(ray, nodes, present)
        files = {name: Path(name).read_bytes() for name in shipped}
        task = ray.remote(num_cpus=0, num_gpus=gpus, max_retries=0)(machine_launch)
        remote = {
            task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                command(rank), os.getcwd(), files
            ): rank
            for rank, node in enumerate(nodes, start=1)
        }
        log.info("machine 0 of %d at %s:%d; launching: %s", machines, ip, port, " ".join(command(0)))
        local = subprocess.Popen(command(0))
        status = None
        while remote:
            status = local.poll() if status is None else status
            done, _ = ray.wait(list(remote), num_returns=1, timeout=1.0)
            for ref in done:
                rank, result = remote.pop(ref), ray.get(ref)
                if result["status"]:
                    log.error("machine %d failed (%d): %s", rank, result["status"], result["output"].strip()[-500:])
                    if status is None:  # machine 0 would wait for it at the next collective: stop it
                        local.terminate()  # torchrun stops its ranks on SIGTERM
                        status = local.wait()
                    status = status or result["status"]
        return local.wait() if status is None else status
    finally:
        ray.shutdown()

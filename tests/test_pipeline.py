"""The DVC pipeline end to end on a tiny profile, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_model, copy_tracked_files, tiny_params, write_instructions_json, write_tweets_csv

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@localhost",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@localhost",
    }
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC copy of the project's tracked files with a tiny profile as params.yaml."""
    tmp = tmp_path_factory.mktemp("pipeline")
    work = copy_tracked_files(tmp / "repo")
    model = build_tiny_model(tmp / "tiny-model")
    params = tiny_params(model, write_tweets_csv(tmp / "tweets.csv"), write_instructions_json(tmp / "instr.json"))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "tiny profile"], work)
    return work


def test_dvc_repro_mix_builds_the_data_stages(repo):
    output = run(["dvc", "repro", "mix"], repo)
    assert stages_run(output) == {"validate", "fetch", "instructify", "mix"}
    stats = json.loads((repo / "data" / "mixed" / "stats.json").read_text())
    rows = [json.loads(line) for line in (repo / "data" / "mixed" / "train.jsonl").read_text().splitlines()]
    tweets = [r for r in rows if r["source"] == "sentiment"]
    labels = {label: sum(r["label"] == label for r in tweets) for label in ("negative", "positive")}
    assert len(rows) == 20 and len(tweets) == 15
    assert stats == {"size": 20, "sentiment": 15, "instructions": 5, "instruction_share": 0.25, "labels": labels}
    assert min(labels.values()) >= 4  # drawn from a balanced train split
    ignored = run(["git", "status", "--porcelain", "--ignored"], repo)
    assert "data/raw" in ignored and "models/base" in ignored


def test_full_repro_then_nothing_to_do(repo):
    output = run(["dvc", "repro"], repo)
    assert stages_run(output) == {"train_sentiment", "train_mixed", "eval_base", "eval_all", "report"}
    report = (repo / "report" / "report.md").read_text()
    for name in ("base", "sentiment", "mixed"):
        score = json.loads((repo / "metrics" / f"{name}.json").read_text())["sentiment"]["score"]
        row = f"| {name} | " + " | ".join(f"{score[k]:.3f}" for k in ("accuracy", "f1", "precision", "recall")) + " |"
        assert row in report
    tfidf = json.loads((repo / "metrics" / "baseline.json").read_text())["sentiment"]["tfidf"]
    assert f"| TF-IDF + logistic regression (baseline) | {tfidf['accuracy']:.3f} |" in report
    assert (repo / "report" / "cards" / "sentiment.md").read_text().count("held-out tweets (label scoring)") == 1
    assert (repo / "models" / "adapters" / "mixed" / "README.md").read_text().startswith("---\nlibrary_name: peft")
    assert stages_run(run(["dvc", "repro"], repo)) == set()
    shown = run(["dvc", "metrics", "show", "--json"], repo)
    assert all(f"metrics/{name}.json" in shown for name in ("base", "sentiment", "mixed"))
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny results"], repo)


def changed_stages(repo: Path) -> set[str]:
    return {name.split(":")[-1] for name in json.loads(run(["dvc", "status", "--json"], repo))}


def test_editing_any_lorapipe_module_changes_exactly_the_stages_that_run_its_folder_or_file(repo):
    from lorapipe.code_deps import dep_entry
    from test_dvc_yaml import STAGES, code_deps

    users = {name: code_deps(stage) for name, stage in STAGES.items()}
    assert changed_stages(repo) == set()
    # Bytecode that Python writes beside a module (whatever PYTHONDONTWRITEBYTECODE says here) changes no stage.
    written = repo / "lorapipe" / "models" / "__pycache__" / "not_imported_yet.cpython-311.pyc"
    written.parent.mkdir(exist_ok=True)
    written.write_bytes(b"bytecode")
    assert changed_stages(repo) == set()
    written.unlink()
    for module in sorted((repo / "lorapipe").rglob("*.py")):
        relative = str(module.relative_to(repo))
        original = module.read_text()
        module.write_text(original + "# an edited comment\n")
        try:
            expected = {name for name, deps in users.items() if dep_entry(relative) in deps}
            assert changed_stages(repo) == expected, relative
        finally:
            module.write_text(original)
    assert changed_stages(repo) == set()


def test_exp_run_lora_rank_reruns_only_what_reads_lora(repo):
    output = run(["dvc", "exp", "run", "-S", "lora.r=4", "--name", "rank4"], repo)
    assert stages_run(output) == {"validate", "train_sentiment", "train_mixed", "eval_all", "report"}
    diff = json.loads(run(["dvc", "metrics", "diff", "--json", "HEAD"], repo))
    assert "metrics/base.json" not in diff and "metrics/baseline.json" not in diff
    assert diff["metrics/train_sentiment.json"]["trainable_parameters"]["diff"] < 0


@pytest.mark.parametrize(
    ("command", "first"),
    [
        (["dvc", "exp", "run", "-S", "lora.r=0", "--name", "rank0"], "validate"),
        # Options that skip the validate stage: the train stage itself refuses, with its outputs in place.
        (["dvc", "repro", "--single-item", "train_sentiment"], "train_sentiment"),
        (["dvc", "repro", "--downstream", "train_sentiment"], "train_sentiment"),
        (["dvc", "exp", "run", "--downstream", "train_sentiment", "-S", "lora.r=0"], "train_sentiment"),
    ],
)
def test_a_bad_value_stops_before_any_output_is_deleted(repo, command, first):
    restore_head(repo)
    kept = {
        path: (repo / path).read_bytes()
        for path in (
            "metrics/train_sentiment.json",
            "models/adapters/sentiment/adapter_model.safetensors",
            "dvclive/sentiment/metrics.json",
            "metrics/sentiment.json",
        )
    }
    if command[:2] == ["dvc", "repro"]:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["lora"]["r"] = 0
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(
        command,
        cwd=repo,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "params.yaml: lora.r: Input should be greater than 0" in done.stdout + done.stderr
    assert stages_run(done.stdout + done.stderr) == {first}
    assert {path: (repo / path).read_bytes() for path in kept} == kept
    restore_head(repo)


def restore_head(repo: Path) -> None:
    run(["git", "reset", "-q", "--hard"], repo)
    run(["dvc", "checkout", "--force"], repo)


def test_exp_run_with_two_processes_reruns_only_training_and_what_follows(repo):
    restore_head(repo)
    output = run(["dvc", "exp", "run", "-S", "train.processes=2", "--name", "two-processes"], repo)
    assert stages_run(output) == {"validate", "train_sentiment", "train_mixed", "eval_all", "report"}
    assert "launching 2 processes" in output
    for name in ("sentiment", "mixed"):
        assert json.loads((repo / "metrics" / f"train_{name}.json").read_text())["processes"] == 2


def test_push_and_pull_through_a_local_remote(repo, tmp_path):
    restore_head(repo)
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "storage")], repo)
    run(["git", "commit", "-qam", "local remote"], repo)
    run(["dvc", "push"], repo)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull", "train_sentiment"], clone)
    assert (clone / "models" / "adapters" / "sentiment" / "adapter_model.safetensors").exists()
    assert not (clone / "models" / "adapters" / "mixed").exists() and not (clone / "models" / "base").exists()
    run(["dvc", "pull"], clone)
    assert stages_run(run(["dvc", "repro"], clone)) == set()
    answer = run(
        ["python", "-m", "lorapipe.cli.chat", "--adapter", "models/adapters/sentiment", "--tweet", "love this"], clone
    )
    assert answer.strip()


def test_an_experiment_travels_through_git_and_dvc_remotes_to_another_machine(repo, tmp_path):
    """Run on one machine, `dvc exp push`; on another (a fresh clone), `dvc exp pull`, show and apply."""
    restore_head(repo)  # HEAD names the DVC remote (the test before committed it), as a GPU machine's clone would
    run(["dvc", "exp", "run", "-S", "lora.r=4", "--name", "travel"], repo)
    origin = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    run(["git", "remote", "add", "origin", str(origin)], repo)
    run(["git", "push", "-q", "origin", "main"], repo)
    run(["dvc", "exp", "push", "origin", "travel"], repo)  # the experiment's Git ref and its outputs' cache

    other = tmp_path / "other-machine"
    run(["git", "clone", "-q", str(origin), str(other)], tmp_path)
    assert "travel" not in run(["dvc", "exp", "list", "--name-only"], other)
    run(["dvc", "exp", "pull", "origin", "travel"], other)
    table = run(["dvc", "exp", "show", "--csv", "--keep", "lora.r"], other)
    assert "travel" in table
    run(["dvc", "exp", "apply", "travel"], other)
    assert yaml.safe_load((other / "params.yaml").read_text())["lora"]["r"] == 4
    for name in ("sentiment", "mixed"):
        assert (other / "metrics" / f"train_{name}.json").read_text() == run(
            ["git", "show", f"{exp_ref(repo, 'travel')}:metrics/train_{name}.json"], repo
        )
        config = json.loads((other / "models" / "adapters" / name / "adapter_config.json").read_text())
        assert config["r"] == 4
    assert "up to date" in run(["dvc", "status"], other).lower()


def exp_ref(repo: Path, name: str) -> str:
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).split()
    return next(ref for ref in refs if ref.endswith(f"/{name}"))


def test_s3_push_interrupted_then_retried_and_pulled_into_a_fresh_clone(repo, tmp_path, monkeypatch):
    import boto3

    from s3_server import TEST_CREDENTIALS, CuttableProxy, moto_server

    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="adapters")
        target = int(endpoint.rsplit(":", 1)[1])
        proxy = CuttableProxy(target, cut_after=5)
        run(["dvc", "remote", "add", "s3", "s3://adapters/store"], repo)
        run(["dvc", "remote", "modify", "s3", "endpointurl", proxy.url], repo)
        run(["dvc", "remote", "modify", "s3", "connect_timeout", "2"], repo)
        run(["git", "commit", "-qam", "s3 remote"], repo)

        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        failed = subprocess.run(
            ["dvc", "push", "-r", "s3"], cwd=repo, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert failed.returncode != 0 and proxy.requests > 5
        assert "could not connect to the endpoint url" in (failed.stdout + failed.stderr).lower()

        CuttableProxy(target, port=proxy.port)  # the server is back on the same address
        assert "pushed" in run(["dvc", "push", "-r", "s3"], repo).lower()

        clone = tmp_path / "s3-clone"
        run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
        run(["dvc", "pull", "-r", "s3"], clone)
        assert "up to date" in run(["dvc", "status"], clone).lower()
        assert stages_run(run(["dvc", "repro"], clone)) == set()
        for name in ("sentiment", "mixed"):
            assert (clone / "metrics" / f"{name}.json").read_text() == (repo / "metrics" / f"{name}.json").read_text()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_registration_leaves_head_and_tags_unchanged(repo):
    """A version GTO would refuse, and --push with no origin: both refused before anything is written."""
    run(["git", "reset", "-q", "--hard"], repo)
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results to register", "--allow-empty"], repo)
    head, tags = run(["git", "rev-parse", "HEAD"], repo), run(["git", "tag", "--list"], repo)
    remotes = run(["git", "remote"], repo).split()
    if "origin" in remotes:  # an earlier test's: --push must find none
        run(["git", "remote", "rename", "origin", "elsewhere"], repo)
    register = [sys.executable, "-m", "lorapipe.cli.register"]
    try:
        for args, message in (
            (["--version", "1.0"], "--version 1.0: not a version GTO registers"),
            (["--version", "v9.0.0", "--push"], "'origin' does not appear to be a git repository"),
            (["--version", "v9.0.0", "--stage", "to prod!"], "--stage to prod!: Invalid value 'to prod!'"),
        ):
            done = subprocess.run([*register, *args], cwd=repo, capture_output=True, text=True, check=False)
            assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
            assert run(["git", "rev-parse", "HEAD"], repo) == head and run(["git", "tag", "--list"], repo) == tags
            assert run(["git", "status", "--porcelain", "dvc.yaml"], repo) == ""
    finally:
        if "origin" in remotes:
            run(["git", "remote", "rename", "elsewhere", "origin"], repo)


def test_registered_versions_are_pulled_by_name_from_git_and_dvc_remotes(repo, tmp_path, monkeypatch):
    """Register v1.0.0, retrain with another rank, register v1.1.0 as prod; from a folder that is no clone,
    `dvc artifacts get` by version tag and by stage returns each version's bytes, through a local DVC remote and
    through S3; `gto show` lists both versions."""
    import boto3

    from s3_server import TEST_CREDENTIALS, moto_server

    restore_head(repo)
    origin = tmp_path / "registry.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    run(["git", "remote", "add", "registry", str(origin)], repo)
    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    run(["dvc", "remote", "add", "-d", "-f", "local", str(tmp_path / "storage")], repo)
    register = ["python", "-m", "lorapipe.cli.register", "--version"]
    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="registry")
        run(["dvc", "remote", "add", "-f", "s3", "s3://registry/store"], repo)
        run(["dvc", "remote", "modify", "s3", "endpointurl", endpoint], repo)
        run(["git", "commit", "-qam", "s3 remote on this server"], repo)
        versions = {}
        rank_now = yaml.safe_load((repo / "params.yaml").read_text())["lora"]["r"]  # earlier tests change it
        for version, rank in (("v1.0.0", None), ("v1.1.0", rank_now + 2)):
            if rank is not None:
                params = yaml.safe_load((repo / "params.yaml").read_text())
                params["lora"]["r"] = rank
                (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
                run(["dvc", "repro"], repo)
                run(["git", "add", "-A"], repo)
                run(["git", "commit", "-qm", f"rank {rank}"], repo)
            run([*register, version, *(["--stage", "prod"] if rank else [])], repo)
            run(["git", "push", "-q", "registry", "main", "--tags"], repo)
            run(["dvc", "push"], repo)
            run(["dvc", "push", "-r", "s3"], repo)
            versions[version] = folder_bytes(repo / "models" / "adapters" / "sentiment")
        assert versions["v1.0.0"] != versions["v1.1.0"]

        meta = yaml.safe_load((repo / "dvc.yaml").read_text())["artifacts"]["sentiment-adapter"]["meta"]
        assert meta["base_model"] == "tiny-llama" and meta["train_examples"] > 0
        assert meta["base_source"]["kind"] == "local" and set(meta["data"]) == {"tweets", "instructions"}
        score = json.loads((repo / "metrics" / "sentiment.json").read_text())["sentiment"]["score"]
        assert meta["metrics"]["accuracy"] == round(score["accuracy"], 4)

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        get = ["dvc", "artifacts", "get", str(origin), "sentiment-adapter"]
        run([*get, "--rev", "v1.0.0", "-o", "v1"], elsewhere)
        run([*get, "--stage", "prod", "-o", "prod"], elsewhere)
        run([*get, "--rev", "v1.0.0", "-o", "v1-s3", "--remote", "s3"], elsewhere)
        assert folder_bytes(elsewhere / "v1") == versions["v1.0.0"] == folder_bytes(elsewhere / "v1-s3")
        assert folder_bytes(elsewhere / "prod") == versions["v1.1.0"]

    clone = tmp_path / "registry-clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    shown = json.loads(run(["gto", "show", "sentiment-adapter", "--json"], clone))
    assert {entry["version"] for entry in shown} >= {"v1.0.0", "v1.1.0"}
    stages = {entry["version"]: entry.get("stages") for entry in shown}
    assert "prod" in str(stages["v1.1.0"]) and "prod" not in str(stages["v1.0.0"])

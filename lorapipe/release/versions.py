"""Registered adapter versions, the way DVC's model registry (GTO) keeps them: Git tags on the commit whose
``dvc.lock`` pins the adapter's bytes, and ``meta`` in ``dvc.yaml`` saying what each adapter is and how well it did.

A version is only registered for a commit whose results are its own: ``dvc.lock``, the params and the metrics
committed, and every stage up to date, so ``dvc artifacts get --rev <tag>`` returns the adapter those metrics
describe.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from lorapipe.errors import PipelineError
from lorapipe.io import read_json
from lorapipe.models.model_card import CARD_FACTS

log = logging.getLogger(__name__)

HEADLINE_SENTIMENT = ("accuracy", "macro_f1", "f1")
HEADLINE_TEXT = ("token_f1", "rouge_l", "bertscore_f1")


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PipelineError(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def model_artifacts(root: Path) -> dict[str, dict[str, Any]]:
    """The model artifacts ``dvc.yaml`` declares (at the root, where GTO and ``dvc artifacts get`` look)."""
    import yaml

    declared = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("artifacts") or {}
    models = {name: spec for name, spec in declared.items() if spec.get("type") == "model"}
    if not models:
        raise PipelineError(f"{root / 'dvc.yaml'}: artifacts: no artifact of type model to register")
    return models


def artifact_meta(root: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """What an adapter is: its base model and revision, the data sources, and its headline figures, read from its
    card, the fetch manifest and the metrics of the same run."""
    adapter = root / spec["path"]
    card, name = adapter / CARD_FACTS, adapter.name
    if not card.is_file():
        raise PipelineError(f"{card}: missing; run `dvc repro` (or `dvc pull`) before registering {spec['path']}")
    facts = read_json(card)
    source = {k: v for k, v in facts["base_model"].get("source", {}).items() if k not in ("format", "parameters")}
    manifest = root / "data" / "raw" / "manifest.json"
    data = {
        kind: {
            k: v
            for k, v in fetched.items()
            if k in ("kind", "id", "revision", "package", "version", "member", "path", "sha256_file", "rows")
        }
        for kind, fetched in (read_json(manifest) if manifest.is_file() else {}).items()
    }
    metrics: dict[str, Any] = {}
    evaluation = root / "metrics" / f"{name}.json"
    if evaluation.is_file():
        scores = read_json(evaluation)
        metrics.update({k: v for k, v in scores["sentiment"]["score"].items() if k in HEADLINE_SENTIMENT})
        metrics.update({k: v for k, v in scores.get("instructions", {}).items() if k in HEADLINE_TEXT})
    validation = facts.get("summary", {}).get("validation") or {}
    if "accuracy" in validation:
        metrics["validation_accuracy"] = validation["accuracy"]
    return {
        "base_model": facts["base_model"].get("name"),
        "base_source": source,
        "data": data,
        "train_examples": facts.get("examples"),
        "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
    }


def write_meta(root: Path, metas: dict[str, dict[str, Any]]) -> bool:
    """Put each artifact's ``meta`` in ``dvc.yaml``; whether anything changed.

    Only the top-level ``artifacts:`` block is rewritten: the stages, their layout and comments stay as written.
    """
    import yaml

    path = root / "dvc.yaml"
    text = path.read_text()
    artifacts = yaml.safe_load(text)["artifacts"]
    changed = False
    for name, meta in metas.items():
        if artifacts[name].get("meta") != meta:
            artifacts[name]["meta"] = meta
            changed = True
    if changed:
        lines = text.splitlines(keepends=True)
        start = next(i for i, line in enumerate(lines) if line.startswith("artifacts:"))
        end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in (" ", "#", "\n", "")), len(lines))
        block = yaml.safe_dump({"artifacts": artifacts}, sort_keys=False, default_flow_style=None, width=110)
        path.write_text("".join(lines[:start]) + block + "".join(lines[end:]))
    return changed


def check_results_committed(root: Path) -> None:
    """Refuse to register a commit whose workspace results are not the committed ones, or are stale."""
    dirty = git(root, "status", "--porcelain", "--", "dvc.lock", "dvc.yaml", "params.yaml", "metrics").strip()
    if dirty:
        raise PipelineError(f"{root}: uncommitted results ({dirty.splitlines()[0].strip()} ...); commit them first")
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stale = repo.status()
    if stale:
        raise PipelineError(
            f"{root / 'dvc.lock'}: stages not up to date ({', '.join(sorted(stale))}); run `dvc repro` (or "
            "`dvc checkout`) and commit, so the registered adapter is the one its metrics describe"
        )


def check_registration(root: Path, artifacts: dict[str, dict[str, Any]], version: str, stage: str | None, push: bool):
    """Everything a registration needs, checked before anything is written: the version's form (GTO's semver with
    a leading v), the stage's name, no tag of the version already there, and with ``push`` a reachable ``origin``
    and a default DVC remote."""
    import re

    from gto.constants import assert_name_is_valid, semver

    if not re.fullmatch(f"v{semver}", version):
        raise PipelineError(
            f"--version {version}: not a version GTO registers (a semantic version with a leading v: v1.0.0)"
        )
    if stage is not None:
        try:
            assert_name_is_valid(stage)
        except Exception as err:
            raise PipelineError(f"--stage {stage}: {err}") from None
    taken = [f"{name}@{version}" for name in artifacts if git(root, "tag", "--list", f"{name}@{version}").strip()]
    if taken:
        raise PipelineError(f"--version {version}: {taken[0]} is already a tag; choose a version above the last")
    if push:
        reach = subprocess.run(["git", "ls-remote", "--heads", "origin"], cwd=root, capture_output=True, text=True)
        if reach.returncode != 0:
            why = (reach.stderr.strip().splitlines() or ["no answer"])[0].removeprefix("fatal: ")
            raise PipelineError(f"--push: the tags cannot reach the Git remote origin ({why})")
        if not subprocess.run(
            ["dvc", "config", "core.remote"], cwd=root, capture_output=True, text=True, check=False
        ).stdout.strip():
            raise PipelineError("--push: no default DVC remote for the adapters' data (`dvc remote add -d NAME URL`)")


def register_adapters(root: Path, version: str, stage: str | None = None, push: bool = False) -> dict[str, str]:
    """Register every model artifact of HEAD as ``version`` (and assign ``stage``); the tags made, by artifact.

    Checks everything first (:func:`check_registration`), then writes the artifacts' ``meta`` into ``dvc.yaml``
    and commits it when it changed, so the tagged commit carries it, and tags. A failure on the way undoes it all:
    the tags made are deleted and HEAD and ``dvc.yaml`` go back to where they were. ``push`` then pushes the tags
    to ``origin`` in one atomic push, and the artifacts' data to the default DVC remote.
    """
    from gto import api

    check_results_committed(root)
    artifacts = model_artifacts(root)
    check_registration(root, artifacts, version, stage, push)
    before = git(root, "rev-parse", "HEAD").strip()
    made: list[str] = []
    try:
        if write_meta(root, {name: artifact_meta(root, spec) for name, spec in artifacts.items()}):
            git(root, "add", "dvc.yaml")
            git(root, "commit", "-q", "-m", f"Artifact meta of the adapters registered as {version}")
        for name in artifacts:
            tags_before = set(git(root, "tag", "--list", f"{name}*").split())
            try:
                api.register(root, name, "HEAD", version=version, message=f"{name} {version}")
                if stage:
                    api.assign(root, name, stage, version=version, message=f"{name} {version} to {stage}")
            except Exception as err:  # gto's own errors: a version lower than the last, for example
                raise PipelineError(f"{name}: gto: {err}") from None
            finally:
                made += sorted(set(git(root, "tag", "--list", f"{name}*").split()) - tags_before)
            log.info("registered %s@%s%s", name, version, f" and assigned it to {stage}" if stage else "")
        if push:
            git(root, "push", "--atomic", "origin", *(f"refs/tags/{tag}" for tag in made))
    except PipelineError:
        for tag in made:
            git(root, "tag", "-d", tag)
        if git(root, "rev-parse", "HEAD").strip() != before:
            git(root, "update-ref", "HEAD", before)
            git(root, "checkout", before, "--", "dvc.yaml")
        log.info("registration undone: HEAD at %s, no tag of %s left", before[:12], version)
        raise
    if push:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            repo.push(targets=[artifacts[name]["path"] for name in artifacts])
    return {name: f"{name}@{version}" for name in artifacts}

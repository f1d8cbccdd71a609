"""dvc.yaml is honest: each stage's deps list exactly the lorapipe modules its script runs, and its cmd every path.

Imports are read with ``ast`` (nothing is executed) by :mod:`lorapipe.code_deps`, which the train stage also uses
to fingerprint its checkpoints: a script's modules are those it imports, directly or through other lorapipe
modules, including imports inside functions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from lorapipe.code_deps import code_deps as script_code_deps
from lorapipe.code_deps import direct_imports

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC["stages"]
PARAMS = yaml.safe_load((ROOT / "profiles" / "embedded.yaml").read_text())


def render(text: str) -> str:
    """DVC's ${section.key} templating, from the embedded profile."""

    def value(match: re.Match) -> str:
        node = PARAMS
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def scripts(stage: dict) -> list[Path]:
    commands = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
    return sorted({ROOT / word for command in commands for word in command.split() if word.startswith("stages/")})


def paths_of(entries: list) -> list[str]:
    return [render(next(iter(e)) if isinstance(e, dict) else e) for e in entries]


def code_deps(stage: dict) -> set[str]:
    """The lorapipe deps a stage must declare: the folders and shared modules its scripts run."""
    return {dep for script in scripts(stage) for dep in script_code_deps(script)}


@pytest.mark.parametrize("name", STAGES)
def test_deps_list_exactly_the_lorapipe_folders_and_shared_modules_the_stage_runs(name):
    stage = STAGES[name]
    used = code_deps(stage)
    declared = {dep for dep in paths_of(stage["deps"]) if dep.startswith("lorapipe/")}
    assert not used - declared, f"stage {name} runs {sorted(used - declared)} but dvc.yaml does not declare them"
    assert not declared - used, f"stage {name} declares {sorted(declared - used)} but never imports from them"
    assert {str(s.relative_to(ROOT)) for s in scripts(stage)} <= set(paths_of(stage["deps"]))


@pytest.mark.parametrize("name", STAGES)
def test_every_path_the_stage_reads_or_writes_is_in_its_cmd(name):
    stage = STAGES[name]
    commands = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
    words = {piece for command in commands for word in render(command).split() for piece in re.split(r"[=,]", word)}
    order_only = paths_of(STAGES["validate"]["outs"])  # the params check's stamp: it orders, nobody reads it
    code = ("lorapipe/", "stages/", "configs/")
    data = [d for d in paths_of(stage["deps"]) if not d.startswith(code) and d not in order_only]
    written = paths_of(stage.get("outs", [])) + paths_of(stage.get("metrics", []))
    for path in data + written:
        inside = any(path == word or path.startswith(word.rstrip("/") + "/") for word in words)
        assert inside, f"stage {name}: {path} is not named by its cmd"
    assert "params.yaml" in words


@pytest.mark.parametrize("script", sorted((ROOT / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stage_scripts_hold_no_path_constants_or_path_defaults(script):
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            defaults = [k.value for k in node.keywords if k.arg == "default"]
            assert all(isinstance(d, ast.List) and not d.elts for d in defaults), (
                f"{script.name}: an argument has a default; dvc.yaml passes every path"
            )
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert not re.match(r"^(data|models|metrics|report|dvclive)/", node.value), (
                f"{script.name}: path constant {node.value!r}"
            )


def test_the_report_gets_its_models_from_dvc_yaml():
    command = STAGES["report"]["cmd"]
    assert [m.split("=")[0] for m in re.findall(r"--model (\S+)", command)] == ["base", "sentiment", "mixed"]
    source = (ROOT / "lorapipe" / "report" / "inputs.py").read_text() + (
        ROOT / "lorapipe" / "report" / "markdown.py"
    ).read_text()
    assert "glob(" not in source


def test_the_train_stages_take_the_process_count_and_config_from_params():
    for name in ("train_sentiment", "train_mixed"):
        command = STAGES[name]["cmd"]
        assert "--processes ${train.processes}" in command
        assert "--accelerate-config ${train.accelerate_config}" in command
        assert "${train.accelerate_config}" in STAGES[name]["deps"]
        assert (ROOT / render("${train.accelerate_config}")).is_file()


def test_any_stage_removes_what_a_killed_stage_left_beside_any_output(tmp_path):
    """A killed fetch leaves ``models/.base.*``; if DVC then serves fetch from its run cache, fetch never runs
    again to remove it, so every stage cleans up beside every output dvc.yaml declares."""
    import shutil
    import subprocess
    import sys

    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    left = [
        tmp_path / "models" / ".base.k1ll3d",
        tmp_path / "data" / ".raw.k1ll3d",
        tmp_path / "metrics" / ".base.json.x",
    ]
    for path in left[:2]:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
    left[2].parent.mkdir()
    left[2].write_text("{")
    kept = tmp_path / "models" / ".gitignore"
    kept.write_text("/base\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "validate.py"), "--params", "params.yaml", "--stamp", "params.checked"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not any(path.exists() for path in left)
    assert kept.exists() and (tmp_path / "params.checked").exists()


def test_the_package_has_no_import_cycles_and_the_shared_modules_import_no_subpackage():
    modules = sorted((ROOT / "lorapipe").rglob("*.py"))
    graph = {m: {d for d in direct_imports(m) if d != m and d.name != "__init__.py"} for m in modules}
    state: dict[Path, str] = {}

    def visit(module: Path, path: list[Path]) -> None:
        state[module] = "open"
        for dep in graph.get(module, ()):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(
                str(p.relative_to(ROOT)) for p in [*path, dep]
            )
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in modules:
        if module not in state:
            visit(module, [module])
    shared = [m for m in modules if m.parent == ROOT / "lorapipe"]
    for module in shared:
        assert all(dep.parent == ROOT / "lorapipe" for dep in graph[module]), f"{module.name} imports a subpackage"

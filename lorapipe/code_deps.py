"""The package code a script runs, as dvc.yaml declares it: the subpackage folders and shared modules it imports.

Imports are read with ``ast`` (nothing is executed), directly or through other lorapipe modules, including imports
inside functions. ``tests/test_dvc_yaml.py`` checks every stage's deps against :func:`code_deps`; the train stage
fingerprints its checkpoints with :func:`code_digest`, so a resumed run never continues under other code.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lorapipe"


def module_path(name: str, root: Path = ROOT) -> Path | None:
    """The file of the lorapipe module or package ``name`` under ``root``, or None."""
    parts = name.split(".")
    file = root.joinpath(*parts).with_suffix(".py")
    package = root.joinpath(*parts) / "__init__.py"
    return file if file.is_file() else package if package.is_file() else None


def direct_imports(path: Path, root: Path = ROOT) -> set[Path]:
    """The lorapipe modules (and the packages they sit in) that ``path`` imports anywhere in its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
            found.add(node.module)
            found |= {
                f"{node.module}.{alias.name}"
                for alias in node.names
                if module_path(f"{node.module}.{alias.name}", root)
            }
    modules = set()
    for name in found:
        parts = name.split(".")
        modules |= {module_path(".".join(parts[:i]), root) for i in range(1, len(parts) + 1)} - {None}
    return modules


def lorapipe_closure(script: Path, root: Path = ROOT) -> set[str]:
    """Every lorapipe module ``script`` runs, as paths relative to ``root``."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for module in direct_imports(todo.pop(), root) - seen:
            seen.add(module)
            todo.append(module)
    return {p.relative_to(root).as_posix() for p in seen}


def dep_entry(module: str) -> str:
    """How dvc.yaml names a module a stage runs: its subpackage's folder, or the shared top-level file."""
    parts = Path(module).parts
    return "/".join(parts[:2]) if len(parts) > 2 else module


def code_deps(script: Path, root: Path = ROOT) -> set[str]:
    """The lorapipe deps a stage running ``script`` declares: the folders and shared modules it runs."""
    return {dep_entry(module) for module in lorapipe_closure(script, root)}


def code_digest(script: Path, root: Path = ROOT) -> str:
    """sha256 over the script and every file of its code deps, as DVC hashes them (bytecode left out, as
    ``.dvcignore`` leaves it): it changes exactly when DVC calls a stage running ``script`` changed by its code."""
    files = {script.resolve()}
    for entry in code_deps(script, root):
        path = root / entry
        files |= {p for p in path.rglob("*") if p.is_file()} if path.is_dir() else {path}
    digest = hashlib.sha256()
    for path in sorted(files):
        if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo", ".pyd"):
            continue
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()

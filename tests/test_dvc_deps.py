"""Dependencies that cannot drift: every `vspa` module a stage script imports (transitively) is a declared dep.

The imports are read with `ast` from the stage script and, recursively, from every `vspa` module it reaches
(imports inside functions included, since a stage's body imports lazily). A module is covered when its file,
or a folder above it, is in the stage's `deps`. Package `__init__.py` files count like modules. A stage whose
`cmd` is not `python stages/<name>.py ...` (none today) is reported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def module_file(name: str) -> Path | None:
    """src/ path of module ``name`` (package -> its __init__.py); None outside src/."""
    base = SRC.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imports_of(path: Path, package: str | None) -> set[str]:
    """Every vspa module ``path`` imports (absolute or relative), with the packages above each."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                parts = (package or "").split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from pkg import submodule`
        for name in names:
            if name == "vspa" or name.startswith("vspa."):
                parts = name.split(".")
                out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in out if module_file(m) is not None}


def closure(script: Path) -> set[Path]:
    """Files of every vspa module reached from ``script``."""
    seen: set[str] = set()
    todo = list(imports_of(script, None))
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        f = module_file(mod)
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        todo += [m for m in imports_of(f, package) if m not in seen]
    return {module_file(m) for m in seen}


def stages() -> dict[str, dict]:
    """Stage name -> {cmd, deps}, foreach/matrix templates taken once (their code deps do not vary)."""
    out = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        out[name] = {"cmd": body["cmd"], "deps": [d for d in body.get("deps", []) if isinstance(d, str)]}
    return out


def undeclared(cmd: str, deps: list[str]) -> list[str]:
    """The stage script and vspa source files ``cmd`` runs that no dep covers (paths relative to the repo)."""
    match = re.search(r"python\s+(stages/\w+\.py)", cmd)
    if not match:
        return [f"cmd {cmd!r} does not run a stages/<name>.py script"]
    script = ROOT / match.group(1)
    needed = {script, *closure(script)}
    covered = [ROOT / d.rstrip("/") for d in deps if "${" not in d]
    missing = []
    for f in sorted(needed):
        if not any(f == c or c in f.parents for c in covered):
            missing.append(f.relative_to(ROOT).as_posix())
    return missing


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_imported_module_is_a_declared_dep(name):
    stage = stages()[name]
    missing = undeclared(stage["cmd"], stage["deps"])
    assert not missing, (f"dvc.yaml stage '{name}' runs code it does not depend on: {missing}. Add them (or a "
                         f"folder above them) to its deps, or `dvc repro` will miss changes to them.")


def test_the_check_fails_when_a_dep_is_dropped():
    """Shown on a real stage: drop the folder of a module `evaluate` imports and the check names that module."""
    stage = stages()["evaluate"]
    assert undeclared(stage["cmd"], stage["deps"]) == []
    assert "src/vspa/evaluation" in stage["deps"]
    missing = undeclared(stage["cmd"], [d for d in stage["deps"] if d != "src/vspa/evaluation"])
    assert "src/vspa/evaluation/runner.py" in missing and "src/vspa/evaluation/voc.py" in missing
    # and an import added to a script without its dep is caught: the closure follows function-level imports
    assert module_file("vspa.evaluation.runner") in closure(ROOT / "stages" / "evaluate.py")

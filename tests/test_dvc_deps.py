"""Dependencies that cannot drift: every `vspa` module a stage script imports (transitively) is a declared dep.

The imports are read with `ast` from the stage script and, recursively, from every `vspa` module it reaches
(imports inside functions included, since a stage's body imports lazily). A module is covered when its file,
or a folder above it, is in the stage's `deps`. Package `__init__.py` files count like modules. A stage whose
`cmd` is not `python stages/<name>.py ...` (none today) is reported.

Paths cannot drift either: "dvc.yaml `cmd` passes every input and output path, and the stage scripts have no
path defaults that can disagree with it". The options of each script's typer command `main` are read with `ast`:
every `Path` option is required (`typer.Option(..., help=...)`; the one fallback derived from another required
option is listed in PATH_FALLBACKS), every stage's `cmd` (foreach / matrix templates included) passes every
required option, and each path it passes is a declared dep or output of the stage (or a folder of one).
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from loaders import load_script

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
    assert not missing, (
        f"dvc.yaml stage '{name}' runs code it does not depend on: {missing}. Add them (or a "
        f"folder above them) to its deps, or `dvc repro` will miss changes to them."
    )


def test_the_check_fails_when_a_dep_is_dropped():
    """Shown on a real stage: drop the folder of a module `evaluate` imports and the check names that module."""
    stage = stages()["evaluate"]
    assert undeclared(stage["cmd"], stage["deps"]) == []
    assert "src/vspa/evaluation" in stage["deps"]
    missing = undeclared(stage["cmd"], [d for d in stage["deps"] if d != "src/vspa/evaluation"])
    assert "src/vspa/evaluation/runner.py" in missing and "src/vspa/evaluation/voc.py" in missing
    # and an import added to a script without its dep is caught: the closure follows function-level imports
    assert module_file("vspa.evaluation.runner") in closure(ROOT / "stages" / "evaluate.py")


# --------------------------------------------------------------------------- paths passed by the cmd

PATH_FALLBACKS = {("evaluate.py", "info_dir"): "<metrics-dir>/info"}
"""Path options that may be omitted: the script derives them from another, required, path option."""


def _is_typer_option(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Attribute) and node.func.attr == "Option")
        or (isinstance(node.func, ast.Name) and node.func.id == "Option")
    )


def _is_path(annotation: ast.AST | None) -> bool:
    """`Path`, `Optional[Path]`, `Path | None` (also as a string annotation)."""
    if annotation is None:
        return False
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return re.search(r"\bPath\b", annotation.value) is not None
    return any(
        isinstance(n, ast.Name) and n.id == "Path" or isinstance(n, ast.Attribute) and n.attr == "Path"
        for n in ast.walk(annotation)
    )


def options_of(source: str, filename: str = "<script>") -> dict[str, dict]:
    """The typer options of ``main`` in a stage script's source: parameter name -> {flags, required, path}.

    An option is required when its default is ``...`` (``typer.Option(..., help=...)``, or no default at all);
    its flags are the ``--names`` given to ``typer.Option``, else ``--<name with - for _>`` (typer's rule).
    """
    tree = ast.parse(source, filename)
    main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
    assert main is not None, f"{filename}: no function main (the typer command)"
    args = main.args.args + main.args.kwonlyargs
    defaults = [None] * (len(main.args.args) - len(main.args.defaults)) + main.args.defaults + main.args.kw_defaults
    out = {}
    for arg, default in zip(args, defaults):
        if not _is_typer_option(default):
            continue
        positional = list(default.args)
        keyword = {k.arg: k.value for k in default.keywords}
        value = positional[0] if positional else keyword.get("default")
        required = value is None or (isinstance(value, ast.Constant) and value.value is Ellipsis)
        decls = [a.value for a in positional[1:] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        flags = [d for d in decls if d.startswith("--")] or [f"--{arg.arg.replace('_', '-')}"]
        out[arg.arg] = {"flags": flags, "required": required, "path": _is_path(arg.annotation)}
    return out


def script_of(cmd: str) -> Path | None:
    match = re.search(r"python\s+(stages/\w+\.py)", cmd)
    return ROOT / match.group(1) if match else None


def passed(cmd: str) -> dict[str, str | None]:
    """Flag -> value of every `--flag value` / `--flag=value` in ``cmd`` (None for a flag without a value)."""
    tokens = shlex.split(cmd)
    out: dict[str, str | None] = {}
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            flag, eq, value = token.partition("=")
            if not eq:
                value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else None
            out[flag] = value
    return out


def missing_options(cmd: str, source: str | None = None) -> list[str]:
    """The required options of the script ``cmd`` runs that ``cmd`` does not pass (first flag of each)."""
    script = script_of(cmd)
    if script is None:
        return [f"cmd {cmd!r} does not run a stages/<name>.py script"]
    given = passed(cmd)
    options = options_of(script.read_text() if source is None else source, str(script))
    return [o["flags"][0] for o in options.values() if o["required"] and not any(f in given for f in o["flags"])]


# Resumable training state: deliberately not a DVC output. An output with cache: false cannot be restored in the
# temporary workspace of a queued experiment (`dvc exp run --queue`), so declaring it would make every such
# experiment retrain every stage; DVC leaves undeclared files alone, so a killed run still resumes from it.
SCRATCH_OPTIONS = {"--work-dir"}


def undeclared_paths(stage: dict) -> list[str]:
    """`--flag value` pairs of the cmd's path options whose value is not a dep or output of the stage, nor a
    folder of one, nor inside one (``${...}`` placeholders compare as text, as in the stage's own lists)."""
    declared = [d.rstrip("/") for d in stage["deps"] + stage["outputs"]]
    options = options_of(script_of(stage["cmd"]).read_text())
    bad = []
    for flag, value in passed(stage["cmd"]).items():
        option = next((o for o in options.values() if flag in o["flags"]), None)
        if option is None or not option["path"] or flag in SCRATCH_OPTIONS:
            continue
        v = (value or "").rstrip("/")
        if not any(v == d or d.startswith(v + "/") or v.startswith(d + "/") for d in declared):
            bad.append(f"{flag} {value}")
    return bad


def stage_paths() -> dict[str, dict]:
    """Stage name -> {cmd, deps, outputs} (outs, metrics and plots), foreach / matrix templates taken once."""
    out = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        outputs = []
        for key in ("outs", "metrics", "plots"):
            for entry in body.get(key, []):
                outputs += [entry] if isinstance(entry, str) else list(entry)
        out[name] = {
            "cmd": body["cmd"],
            "deps": [d for d in body.get("deps", []) if isinstance(d, str)],
            "outputs": outputs,
        }
    return out


def test_stage_scripts_have_no_path_defaults():
    """Every Path option of every stage script is required: a caller that omits one fails at once instead of
    reading or writing a default folder (the benchmark that trained on data/benchmark without --data)."""
    scripts = sorted((ROOT / "stages").glob("*.py"))
    assert scripts
    with_default = []
    for script in scripts:
        for name, option in options_of(script.read_text(), str(script)).items():
            if option["path"] and not option["required"] and (script.name, name) not in PATH_FALLBACKS:
                with_default.append(f"{script.name}: --{name.replace('_', '-')}")
    assert not with_default, (
        f"path options with a default: {with_default}. Make them required "
        f"(typer.Option(..., help=...)) and pass them in dvc.yaml's cmd."
    )
    assert options_of((ROOT / "stages" / "train.py").read_text())["params"]["required"] is False  # kept


@pytest.mark.parametrize("name", sorted(stage_paths()))
def test_every_cmd_passes_every_required_option(name):
    stage = stage_paths()[name]
    missing = missing_options(stage["cmd"])
    assert not missing, (
        f"dvc.yaml stage '{name}': cmd {stage['cmd']!r} omits the required options {missing} "
        f"of its script. Pass them (the paths of the stage's deps / outs)."
    )


@pytest.mark.parametrize("name", sorted(stage_paths()))
def test_every_path_the_cmd_passes_is_declared(name):
    stage = stage_paths()[name]
    bad = undeclared_paths(stage)
    assert not bad, (
        f"dvc.yaml stage '{name}': cmd passes {bad}, which are neither deps nor outputs of the stage "
        f"(nor folders of them). Declare them, or pass the declared path."
    )


def test_the_option_check_fails_when_an_option_is_dropped():
    """Shown on real stages: drop one path option from a cmd (a plain stage and a foreach template), or give a
    script's path option its old default back, or pass an undeclared path, and the checks name it."""
    stages_ = stage_paths()
    pretrain = stages_["pretrain"]["cmd"]
    assert missing_options(pretrain) == []
    assert "--data data/benchmark/source_train" in pretrain
    assert missing_options(pretrain.replace("--data data/benchmark/source_train", "")) == ["--data"]
    adapt = stages_["adapt"]["cmd"]  # the foreach template, ${item} placeholders and all
    assert missing_options(adapt) == [] and "--log-dir reports/adapt/${item}" in adapt
    assert missing_options(adapt.replace("--log-dir reports/adapt/${item}", "")) == ["--log-dir"]
    assert missing_options(adapt.replace("--out models/adapt/${item} ", "")) == ["--out"]
    # a default brought back makes the option optional, so the script-level check names it
    source = (ROOT / "stages" / "train.py").read_text()
    old = re.search(r"data: Path = typer\.Option\(\s*\.\.\.,", source)  # the formatter may wrap the call
    assert old, "stages/train.py: no required --data option"
    restored = options_of(source.replace(old[0], 'data: Path = typer.Option(Path("data/benchmark/source_train"),'))
    assert restored["data"] == {"flags": ["--data"], "required": False, "path": True}
    # a path that is neither a dep nor an output
    stage = dict(stages_["extract_memory"])
    assert undeclared_paths(stage) == []
    stage["cmd"] = stage["cmd"].replace("--data data/benchmark/source_train", "--data data/benchmark/target_train")
    assert undeclared_paths(stage) == ["--data data/benchmark/target_train"]


def test_the_ast_reading_agrees_with_typer():
    """options_of reads what typer builds: the same required flags as the click command of a real script."""

    import typer

    script = ROOT / "stages" / "report.py"
    module = load_script("stages/report.py")
    app = typer.Typer(add_completion=False)  # typer.run's command, without the completion options
    app.command()(module.main)
    command = typer.main.get_command(app)
    from_typer = {p.name: (sorted(p.opts), p.required) for p in command.params}
    from_ast = {n: (sorted(o["flags"]), o["required"]) for n, o in options_of(script.read_text()).items()}
    assert from_ast == from_typer
    assert from_ast["out"] == (["--out"], True) and from_ast["rows"] == (["--rows"], False)


def test_uncached_outputs_are_committed_files():
    """An output with `cache: false` is restored from git only: if git ignores it, a fresh clone or the temporary
    workspace of a queued experiment lacks it and DVC reruns its stage (and everything after it)."""
    import re
    import subprocess

    ignored = []
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        for key in ("outs", "metrics", "plots"):
            for entry in body.get(key, []):
                if isinstance(entry, dict):
                    path, opts = next(iter(entry.items()))
                    if (opts or {}).get("cache") is False:
                        concrete = re.sub(r"\$\{[^}]*\}", "x", path)
                        if subprocess.run(["git", "check-ignore", "-q", concrete], cwd=ROOT).returncode == 0:
                            ignored.append(f"{name}: {path}")
    assert not ignored, f"cache: false outputs that git ignores: {ignored}. Cache them, or commit them."

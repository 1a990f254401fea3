"""End to end: `dvc repro` of the real dvc.yaml on a tiny config in a temporary git repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Tiny overrides of params.yaml: a few small images and a few iterations per model, enough to run every
# stage for real on a 2-core CPU (measured 2026-12-03: the 20 stages of the protocol rows in 116 s, the AugSim
# experiment's 22 in 131 s, the translators' 29 in 200 s; most of it is each stage's Python importing torch and
# torchvision, about 5 s). Values are checked for plausibility, not quality.
TINY = {
    "prepare": {
        "height": 96,
        "width": 192,
        "source_train": 8,
        "source_test": 4,
        "target_train": 8,
        "target_test": 4,
        "target_val": 4,
    },
    "model": {"min_size": 96, "max_size": 192},
    "pretrain": {"iterations": 4, "batch_size": 2, "warmup_iters": 1, "lr_steps": [3], "checkpoint_every": 2},
    "oracle": {"iterations": 4, "batch_size": 2, "warmup_iters": 1, "lr_steps": [3], "checkpoint_every": 2},
    "adapt": {"iterations": 3, "batch_size": 1, "checkpoint_every": 2, "refresh_every": 2, "tau": 0.0},
    "evaluate": {"batch_size": 4},
    # The AugSim experiment needs no entry of its own: its detector, memory and four pairing runs read
    # pretrain, extract_memory, subsample and adapt above (adapt_pairing_* only set the mode and the sets).
    "translate": {
        "iterations": 3,
        "checkpoint_every": 2,
        "crop_height": 32,
        "crop_width": 64,
        "ngf": 8,
        "ndf": 8,
        "num_patches": 32,
        "queue_size": 16,
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


# The opt-in experiments of dvc.yaml (README: `make augsim`, `make translate`; not part of `make repro`): about
# 50 stages, each starting a Python with torch (~5 s here), which would take the default suite past its 10-minute
# aim. The default suite reproduces dvc.yaml without them (`core_repo`: every row of the comparison protocol at
# seed 0, about 20 stages); `make test-slow` reproduces the whole file (`full_repo`).
OPT_IN_STAGES = (
    "translate_train",
    "translate_apply",
    "report_translate",
    "report_all",
    "augsim",
    "pretrain_augsim",
    "extract_memory_augsim",
    "subsample_augsim",
    "adapt_pairing",
    "evaluate_augsim",
    "evaluate_augsim_source",
    "augsim_report",
)
OPT_IN_EVALUATIONS = "translate_"  # evaluate's foreach entries of the translator rows


def core_dvc_yaml() -> dict:
    """dvc.yaml without the opt-in experiments; fails if one of the names above is no longer in the file."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = pipeline["stages"]
    assert set(OPT_IN_STAGES) <= set(stages), sorted(set(OPT_IN_STAGES) - set(stages))
    for name in OPT_IN_STAGES:
        del stages[name]
    evaluations = stages["evaluate"]["foreach"]
    dropped = [key for key in evaluations if key.startswith(OPT_IN_EVALUATIONS)]
    assert len(dropped) == 9, dropped  # 3 translator variants x 3 seeds
    for key in dropped:
        del evaluations[key]
    return pipeline


def _build(tmp_path_factory, full: bool) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("repo_full" if full else "repo_core")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    if full:
        shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    else:
        (repo / "dvc.yaml").write_text(yaml.safe_dump(core_dvc_yaml(), sort_keys=False))
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="2",
    )
    env.pop("CI", None)
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "config", "user.email", "ci@example.com"], repo, env)
    _run(["git", "config", "user.name", "ci"], repo, env)
    _run([str(BIN / "dvc"), "init", "-q"], repo, env)
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    _run([str(BIN / "dvc"), "repro"], repo, env)
    return repo, env


@pytest.fixture(scope="module")
def core_repo(tmp_path_factory) -> tuple[Path, dict]:
    """`dvc repro` of dvc.yaml without the opt-in experiments (every protocol row at seed 0)."""
    return _build(tmp_path_factory, full=False)


@pytest.fixture(scope="module")
def full_repo(tmp_path_factory) -> tuple[Path, dict]:
    """`dvc repro` of the whole dvc.yaml: the AugSim experiment and the translator rows included."""
    return _build(tmp_path_factory, full=True)


REPOS = ["core_repo", pytest.param("full_repo", marks=pytest.mark.slow)]


def lock_stages(repo: Path) -> set[str]:
    return set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"])


@pytest.mark.e2e
@pytest.mark.parametrize("which", REPOS)
def test_repro_writes_metrics_for_every_evaluation(which, request):
    repo, _ = request.getfixturevalue(which)
    full = which == "full_repo"
    stages = lock_stages(repo)
    assert {"prepare", "pretrain", "oracle", "extract_memory", "subsample", "adapt@vspa", "report"} <= stages
    assert ("report_all" in stages) == full and ("augsim_report" in stages) == full
    rows = (
        "source_on_source",
        "source_on_target",
        "oracle_on_target",
        "fair_source",
        "at_like",
        "mila_like",
        "bg_only",
        "vspa",
    )
    translators = tuple(f"translate_{v}_s{k}" for v in ("cut", "attention", "attention_lg") for k in (0, 1, 2))
    assert not full or {f"evaluate@{name}" for name in translators} <= stages
    for name in rows + (translators if full else ()):
        metrics = json.loads((repo / "reports" / "metrics" / f"{name}.json").read_text())
        assert 0.0 <= metrics["mAP"] <= 100.0
        assert set(metrics["AP"]) == {"car", "person", "truck"}
        assert json.loads((repo / "reports" / "metrics" / "info" / f"{name}.json").read_text())["num_images"] == 4
        assert list(metrics) == ["mAP", "AP", "coco_mAP50", "coco_AP50"]  # both AP50 flavours, nothing else
        assert set(metrics["coco_AP50"]) == {"car", "person", "truck"}
    assert (repo / "data" / "benchmark" / "target_val" / "annotations.json").is_file()
    for run in ("at_like", "vspa"):  # the diagnostics of every adaptation run: metrics and plots
        diag = json.loads((repo / "reports" / "adapt" / run / "diagnostics.json").read_text())
        assert diag["grad_samples"] >= 1 and "bg_disc_acc" in diag["second_half"]
        for plot in ("diagnostics.csv", "grad_shares.csv"):
            assert (repo / "reports" / "adapt" / run / plot).stat().st_size > 0
    assert (repo / "models" / "source" / "model.pt").stat().st_size > 0
    table = (repo / "reports" / "comparison.md").read_text()
    from vspa.reporting.tables import ROW_DESCRIPTIONS

    for row in ("source_on_target", "fair_source", "at_like", "vspa", "oracle_on_target"):
        assert ROW_DESCRIPTIONS[row] in table, table
    assert "missing" not in table
    rows_table = (repo / "reports" / "comparison_rows.md").read_text()  # every protocol row, seed 0
    assert (
        all(ROW_DESCRIPTIONS[r] in rows_table for r in rows if r != "source_on_source") and "missing" not in rows_table
    )
    fair = json.loads((repo / "reports" / "adapt" / "fair_source" / "summary.json").read_text())
    assert fair["pseudo_labels_per_image"] == 0  # no target image was read
    if not full:
        return
    assert "missing" not in (repo / "reports" / "comparison_all.md").read_text()
    seeds_md = (repo / "reports" / "translate" / "seeds.md").read_text()  # the translator rows over 3 seeds
    assert "Paired mAP difference against **Translator without attention (CUT-like)" in seeds_md
    assert seeds_md.count("| attention_lg | ") == 3  # one diagnostics line per seed


@pytest.mark.e2e
@pytest.mark.slow
def test_repro_runs_the_augsim_experiment(full_repo):
    repo, _ = full_repo
    stages = lock_stages(repo)
    modes = ("exact", "color", "flip", "color_flip")
    assert {"augsim", "pretrain_augsim", "extract_memory_augsim", "subsample_augsim", "augsim_report"} <= stages
    runs = [f"{m}_s{k}" for m in modes for k in (0, 1)]  # two adaptation seeds per mode
    matrix = [f"{m}-{k}" for m in modes for k in (0, 1)]  # dvc.yaml's matrix: mode x seed
    assert {f"adapt_pairing@{r}" for r in matrix} | {f"evaluate_augsim@{r}" for r in matrix} <= stages
    assert "evaluate_augsim_source" in stages
    for name in runs + ["source_only"]:
        metrics = json.loads((repo / "reports" / "augsim" / "metrics" / f"augsim_{name}.json").read_text())
        info = json.loads((repo / "reports" / "augsim" / "metrics" / "info" / f"augsim_{name}.json").read_text())
        assert 0.0 <= metrics["mAP"] <= 100.0 and info["num_images"] == 4
        assert info["data"] == "data/foggy_augsim/target_test"
    for run in runs:
        mode = run.rsplit("_s", 1)[0]
        summary = json.loads((repo / "reports" / "augsim" / "adapt" / run / "summary.json").read_text())
        assert summary["fg_mode"] == "pairing" and summary["pairing_mode"] == mode and summary["iterations"] == 3
    results = json.loads((repo / "reports" / "augsim" / "results.json").read_text())
    assert all(results[m]["n"] == 2 and results[m]["seeds"] == [0, 1] for m in modes)
    assert results["source_only"] is not None
    assert "Missing" not in (repo / "reports" / "augsim" / "table.md").read_text()
    assert (repo / "reports" / "augsim" / "bar.png").stat().st_size > 0


@pytest.mark.e2e
@pytest.mark.parametrize("which", REPOS)
def test_second_repro_is_a_no_op_and_params_invalidate_only_their_stages(which, request):
    """Each params section and code file invalidates exactly the stages that read it (of those the repo has)."""
    repo, env = request.getfixturevalue(which)
    present = lock_stages(repo)
    status = _run([str(BIN / "dvc"), "status", "--json"], repo, env)
    assert json.loads(status.stdout or "{}") == {}
    original = (repo / "params.yaml").read_text()

    def changed_after(section: str, key: str, value) -> set[str]:
        params = yaml.safe_load(original)
        params[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        try:
            changed = set(json.loads(_run([str(BIN / "dvc"), "status", "--json"], repo, env).stdout))
        finally:
            (repo / "params.yaml").write_text(original)
        assert changed <= present, changed - present
        return changed

    def expect(names: set[str]) -> set[str]:
        return names & present

    assert changed_after("pretrain", "lr", 0.005) == expect({"pretrain", "pretrain_augsim"})  # the same recipe
    assert changed_after("oracle", "lr", 0.005) == {"oracle"}
    assert changed_after("subsample", "fg_ratio", 0.7) == expect({"subsample", "subsample_augsim"})
    assert changed_after("adapt_vspa", "lambda_fg", 0.1) == {"adapt@vspa"}
    assert changed_after("adapt_pairing_flip", "pairing_mode", "exact") == expect(
        {"adapt_pairing@flip-0", "adapt_pairing@flip-1"}
    )
    assert changed_after("augsim", "fog_beta", 0.05) == expect({"augsim"})
    assert changed_after("translate", "lambda_ga", 0.5) == expect(
        {f"translate_train@{v}-{k}" for v in ("cut", "attention", "attention_lg") for k in (0, 1, 2)}
    )
    changed = changed_after("evaluate", "iou", 0.6)
    assert changed and all(
        name.split("@")[0] in ("evaluate", "evaluate_augsim", "evaluate_augsim_source") for name in changed
    ), changed

    # Byte-code caches next to the sources (written on import unless PYTHONDONTWRITEBYTECODE is set) are
    # not part of a code dependency's hash.
    cache = repo / "src/vspa/adaptation/__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "trainer.cpython-311.pyc").write_bytes(b"\x00" * 16)
    try:
        assert json.loads(_run([str(BIN / "dvc"), "status", "--json"], repo, env).stdout or "{}") == {}
    finally:
        shutil.rmtree(cache)

    def changed_after_edit(path: str) -> set[str]:
        file = repo / path
        text = file.read_text()
        file.write_text(text + "\n# edited\n")
        try:
            changed = set(json.loads(_run([str(BIN / "dvc"), "status", "--json"], repo, env).stdout))
        finally:
            file.write_text(text)
        assert changed <= present, changed - present
        return changed

    # The scenario files are read at run time (real-data checks, older null-style params files): editing one
    # reruns the stages that read them (the adaptation runs included), and nothing else. (Their values reach
    # params.yaml through `make params` / `dvc exp run -S`.) The augmentations are code of every training stage.
    pairing = {f"adapt_pairing@{m}-{s}" for m in ("exact", "color", "flip", "color_flip") for s in (0, 1)}
    adapt_rows = {f"adapt@{r}" for r in ("fair_source", "at_like", "vspa", "mila_like", "bg_only")}
    training = expect({"pretrain", "oracle", "pretrain_augsim", *adapt_rows, *pairing})
    assert adapt_rows <= training
    assert changed_after_edit("src/vspa/presets/synth_fog.yaml") == {"prepare", *training}
    assert training <= changed_after_edit("src/vspa/data/transforms.py")
    translators = {
        f"translate_{step}@{v}-{k}"
        for step in ("train", "apply")
        for v in ("cut", "attention", "attention_lg")
        for k in (0, 1, 2)
    }
    # vspa.training is the plumbing of every training loop, the translator's included (both translator stages
    # declare it: they import vspa.translation.trainer, which uses it), and of evaluation (its data threads)
    evaluations = {s for s in present if s.startswith("evaluate")}
    assert evaluations and evaluations < present
    assert changed_after_edit("src/vspa/training/precision.py") == training | expect(translators) | evaluations


def readme_sweep_block() -> list[str]:
    """The command lines of the README's marked sweep example (comments stripped)."""
    text = (ROOT / "README.md").read_text()
    marker = "<!-- sweep-example: executed by tests/test_e2e_dvc.py -->"
    assert marker in text, "the README lost its marked sweep example"
    block = text.split(marker, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines() if line.strip()]


@pytest.mark.e2e
def test_readme_sweep_example_runs(core_repo):
    """Last in this file: it commits the tiny repo and leaves the last experiment in its workspace."""
    import time

    repo, env = core_repo
    env = dict(env, PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny pipeline"], repo, env)
    outputs = {}
    for line in readme_sweep_block():
        outputs[line] = _run(["bash", "-c", line], repo, env).stdout
        if line.startswith("dvc queue start"):
            deadline = time.time() + 900
            while True:  # the worker runs the queued experiments in the background
                status = _run([str(BIN / "dvc"), "queue", "status"], repo, env).stdout
                if not any(word in status for word in ("Queued", "Running")):
                    break
                assert time.time() < deadline, f"queued experiments still running:\n{status}"
                time.sleep(5)
            assert "Failed" not in status, status
            assert status.count("Success") == 2, status
    shown = next(out for line, out in outputs.items() if line.startswith("dvc exp show"))
    print(shown)
    # the changed params are listed; --drop (a regex matched from the column name's start) removes the
    # diagnostics; an unchanged row is not listed (a tiny run's mAP may not change, so it is not required)
    assert "adapt_vspa.fg_mode" in shown and "adapt_vspa.bg_mode" in shown
    assert "diagnostics" not in shown and "at_like.json" not in shown
    names = _run([str(BIN / "dvc"), "exp", "list", "--name-only"], repo, env).stdout.split()
    assert len(names) == 3, names
    assert (repo / "dvc_plots" / "index.html").is_file()  # dvc plots diff wrote its page

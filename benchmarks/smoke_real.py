"""`make smoke-real`: each real-data preset through the real `dvc.yaml` at real image size, before GPU hours.

For every scenario (``cityscapes_foggy``, ``sim10k_cityscapes``, ``voc_comic2k``) in a temporary git + DVC
repository holding this project's ``dvc.yaml``, ``stages/`` and ``src/``: :func:`vspa.data.smoke.write_fixture`
writes a few images per split in the preset's real folder layout and image size, a randomly initialised
backbone of the preset's architecture is saved as ``model.pretrained_weights`` (no download), and
``dvc repro report`` runs prepare -> pretrain -> oracle -> extract_memory -> subsample -> adapt (fair source,
AT-like, VSPA; each with a memory refresh) -> evaluate -> report with ``--iterations`` iterations per training
stage and batch 1, on the CPU unless ``--device``. What is checked: every stage runs, the metrics files exist,
and the report has every row. Wall time per scenario goes to ``<out>/smoke_real.{json,md}``.

    python benchmarks/smoke_real.py [--scenarios cityscapes_foggy,voc_comic2k] [--iterations 2]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vspa.config import compose, load_preset  # noqa: E402
from vspa.data.smoke import SCENARIOS, write_fixture, write_random_weights  # noqa: E402
from vspa.utils import VspaError, run_stage, write_json_atomic, write_text_atomic  # noqa: E402

ROWS = ("source_on_target", "fair_source", "at_like", "vspa", "oracle_on_target")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def smoke_params(scenario: str, data_root: Path, weights: Path, iterations: int, device: str) -> dict:
    """params.yaml of the smoke run: the scenario's composed params (conf/), the fixture, the random weights,
    and ``iterations`` per training stage at batch 1."""
    train = {
        "iterations": iterations,
        "batch_size": 1,
        "warmup_iters": 1,
        "lr_steps": [],
        "checkpoint_every": 1,
        "device": device,
    }
    over = {
        "scenario": scenario,
        "data": {"root": str(data_root)},
        "model": {"pretrained_weights": str(weights)},
        "pretrain": train,
        "oracle": train,
        "adapt": {
            "iterations": iterations,
            "batch_size": 1,
            "checkpoint_every": 1,
            "refresh_every": 1,
            "tau": 0.0,
            "device": device,
        },
        "extract_memory": {"device": device},
        "subsample": {"device": device},
        "evaluate": {"batch_size": 1, "device": device},
    }
    if scenario == "sim10k_cityscapes":  # Sim10k has no test split: the preset samples 500 images of it
        over["prepare"] = {"splits": {"source_test": {"sample": 2}}}
    return _merge(compose(ROOT / "conf", [f"scenario={scenario}"]), over)  # what `-S scenario=...` composes


def repo_env(repo: Path, **extra: str) -> dict[str, str]:
    """The environment of a `dvc repro` in the copy ``repo``: this interpreter's tools first on PATH, its own
    ``src`` importable, no DVC analytics, unbuffered output; ``extra`` added."""
    return dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(repo / "src"),
        **extra,
    )


def project_copy(repo: Path) -> Path:
    """A new folder ``repo`` with this project's dvc.yaml, ignore files, stages/ and src/ (what a stage runs)."""
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return repo


def run_scenario(scenario: str, work: Path, iterations: int, device: str) -> dict:
    repo = project_copy(work / scenario)
    start = time.perf_counter()
    data_root = write_fixture(scenario, repo / "datasets")
    backbone = load_preset(scenario)["model"]["backbone"]
    weights = write_random_weights(backbone, repo / "weights" / f"{backbone}_random.pth")
    fixture_seconds = time.perf_counter() - start
    params = smoke_params(scenario, data_root, weights, iterations, device)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = repo_env(repo)
    log = work / f"{scenario}.log"
    with open(log, "w") as f:
        for cmd in (
            ["git", "init", "-q"],
            ["git", "config", "user.email", "smoke@example.com"],
            ["git", "config", "user.name", "smoke"],
            ["dvc", "init", "-q"],
            ["dvc", "repro", "report"],
        ):
            proc = subprocess.run(cmd, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT)
            if proc.returncode:
                tail = "\n".join(log.read_text().splitlines()[-15:])
                raise VspaError(f"smoke-real {scenario}: `{' '.join(cmd)}` failed (see {log}):\n{tail}")
    missing = [r for r in ROWS if not (repo / "reports" / "metrics" / f"{r}.json").is_file()]
    table = (repo / "reports" / "comparison.md").read_text()
    if missing or "missing" in table:
        raise VspaError(f"smoke-real {scenario}: metrics missing for {missing or 'a row of the report'} (see {log}).")
    summary = json.loads((repo / "reports" / "data" / "summary.json").read_text())
    sizes = {split: s["images"] for split, s in summary["splits"].items()}
    return {
        "scenario": scenario,
        "backbone": backbone,
        "iterations": iterations,
        "device": device,
        "images": sizes,
        "fixture_seconds": round(fixture_seconds, 1),
        "repro_seconds": round(time.perf_counter() - start - fixture_seconds, 1),
    }


def main(
    scenarios: str = typer.Option(",".join(SCENARIOS), help="Comma-separated real-data presets."),
    iterations: int = typer.Option(2, help="Iterations per training stage (batch 1)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    out: Path = typer.Option(Path("reports/bench"), help="Folder of smoke_real.{json,md}."),
    keep: Path = typer.Option(None, help="Keep the temporary repositories here (default: deleted)."),
) -> None:
    def body() -> None:
        names = [s for s in scenarios.split(",") if s]
        unknown = sorted(set(names) - set(SCENARIOS))
        if unknown:
            raise VspaError(f"--scenarios: unknown {unknown}; known: {', '.join(SCENARIOS)}.")
        work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="vspa_smoke_real_"))
        results = []
        try:
            for scenario in names:
                results.append(run_scenario(scenario, work, iterations, device))
                print(f"[smoke-real] {scenario}: ok, dvc repro {results[-1]['repro_seconds']} s", flush=True)
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
        write_json_atomic(out / "smoke_real.json", results)
        lines = [
            "| scenario | backbone | images per split | iterations per stage | fixture (s) | dvc repro report (s) |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in results:
            lines.append(
                f"| {r['scenario']} | {r['backbone']} | "
                + ", ".join(f"{k} {v}" for k, v in r["images"].items())
                + f" | {r['iterations']} | {r['fixture_seconds']} | {r['repro_seconds']} |"
            )
        write_text_atomic(out / "smoke_real.md", "\n".join(lines) + "\n")
        print("\n".join(lines))

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

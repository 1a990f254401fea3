"""Choose the translator's CPU training budget on the labelled target *validation* split (never on target test).

Each candidate is the committed ``params.yaml`` with some ``translate`` keys overridden (every key the study
varies is pinned below, so a later change of a default does not change a recorded candidate). Per candidate and
seed, the real stage scripts run as the pipeline runs them: ``stages/translate_train.py`` (target_train ->
source_train style), ``stages/translate_apply.py`` on ``data/benchmark/target_val``, and ``stages/evaluate.py``
with the pipeline's frozen source detector (``models/source/model.pt``: run ``dvc repro pretrain`` first) on
the translated validation images. Runs go ``--jobs`` at a time, each pinned to one thread
(``OMP_NUM_THREADS=1``), so a rerun on the same machine gives the same numbers; a seed fixes every random draw
of a translator run, so the candidates of one seed are paired.

Output ``<out>/results.{json,md}``: validation mAP per candidate (mean +- std, per seed), the paired difference
of each candidate against the current default with a 95% Student-t interval, the wall time per run and per
iteration, and whether PatchNCE was still falling at the end (its mean over the last 10% of the iterations
against the 10% before). The rule, fixed before the runs: the candidate with the highest mean replaces the
default only if its paired difference against the default is shown (the interval excludes 0); otherwise the
default stays.

    python benchmarks/translator_budget.py                          # every candidate, seeds 0-2, attention_lg
    python benchmarks/translator_budget.py --only const80_1000 --seeds 0   # a subset
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rows import parse_seeds  # noqa: E402
from vspa.reporting.seeds import paired  # noqa: E402
from vspa.utils import VspaError, write_json_atomic, write_text_atomic  # noqa: E402

REFERENCE = "default_1000"
# name -> translate overrides; every key the study varies is pinned in each candidate
CANDIDATES = {
    "default_1000": {"iterations": 1000, "lr_decay_start": 0.5, "crop_height": 64, "crop_width": 128},
    "const80_1000": {"iterations": 1000, "lr_decay_start": 0.8, "crop_height": 64, "crop_width": 128},
    "const80_3000": {"iterations": 3000, "lr_decay_start": 0.8, "crop_height": 64, "crop_width": 128},
    "crop128_1000": {"iterations": 1000, "lr_decay_start": 0.5, "crop_height": 128, "crop_width": 256},
}
DESCRIPTIONS = {
    "default_1000": "1,000 iterations, lr constant for 50% then linear decay, 64x128 crops (the current default)",
    "const80_1000": "1,000 iterations, lr constant for 80%, 64x128 crops",
    "const80_3000": "3,000 iterations, lr constant for 80%, 64x128 crops",
    "crop128_1000": "1,000 iterations, lr constant for 50%, 128x256 crops (4x the pixels)",
}


def _run(cmd: list[str], log: Path, env: dict) -> None:
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text().splitlines()[-3:]
        raise VspaError(f"{' '.join(cmd[1:3])} failed (exit {proc.returncode}), see {log}: {' | '.join(tail)}")


def nce_tail(losses_csv: Path) -> dict:
    """PatchNCE's mean over the last 10% of the iterations and over the 10% before: still falling at the end?"""
    with open(losses_csv) as f:
        values = [float(row["loss_NCE"]) for row in csv.DictReader(f)]
    n = max(1, len(values) // 10)
    before, last = values[-2 * n : -n], values[-n:]
    return {
        "nce_80_90": round(statistics.fmean(before), 4),
        "nce_90_100": round(statistics.fmean(last), 4),
        "nce_tail_change": round(statistics.fmean(last) / statistics.fmean(before) - 1, 4),
    }


def run_one(name: str, seed: int, variant: str, work_root: Path, detector: Path) -> dict:
    """Train (unless ``model.pt`` exists: a finished run is reused), translate target_val, evaluate."""
    work = work_root / name / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["translate"].update(CANDIDATES[name], seed=seed, device="cpu")
    params["evaluate"]["device"] = "cpu"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    py, p = sys.executable, str(work / "params.yaml")
    log = work / "run.log"
    model = work / "models" / variant / "model.pt"
    seconds = None
    if not model.is_file():
        start = time.perf_counter()
        _run(
            [py, "stages/translate_train.py", "--params", p, "--variant", variant, "--seed", str(seed),
             "--target", "data/benchmark/target_train", "--source", "data/benchmark/source_train",
             "--out-dir", str(work / "models"), "--reports-dir", str(work / "reports")],
            log, env,
        )  # fmt: skip
        seconds = round(time.perf_counter() - start, 1)
        write_json_atomic(work / "train_seconds.json", {"seconds": seconds})
    elif (work / "train_seconds.json").is_file():
        seconds = json.loads((work / "train_seconds.json").read_text())["seconds"]
    _run(
        [py, "stages/translate_apply.py", "--params", p, "--variant", variant, "--data", "data/benchmark/target_val",
         "--models-dir", str(work / "models"), "--out-dir", str(work / "translated")],
        log, env,
    )  # fmt: skip
    _run(
        [py, "stages/evaluate.py", "--params", p, "--model", str(detector),
         "--data", str(work / "translated" / variant / "target_val"), "--name", "val",
         "--metrics-dir", str(work / "metrics"), "--plots-dir", str(work / "metrics")],
        log, env,
    )  # fmt: skip
    metrics = json.loads((work / "metrics" / "val.json").read_text())
    diag = json.loads((work / "reports" / f"{variant}_diagnostics.json").read_text())
    iterations = CANDIDATES[name]["iterations"]
    return {
        "name": name,
        "seed": seed,
        "variant": variant,
        "val_mAP": metrics["mAP"],
        "val_AP": metrics.get("AP"),
        "train_seconds": seconds,
        "seconds_per_iteration": None if seconds is None else round(seconds / iterations, 4),
        **nce_tail(work / "reports" / f"{variant}_losses.csv"),
        "diagnostics": diag,
    }


def summarise(results: list[dict], names: list[str]) -> dict:
    per = {n: {r["seed"]: r["val_mAP"] for r in results if r["name"] == n} for n in names}
    rows = {}
    for n in names:
        values = [per[n][s] for s in sorted(per[n])]
        runs = [r for r in results if r["name"] == n]
        secs = [r["train_seconds"] for r in runs if r["train_seconds"] is not None]
        rows[n] = {
            "seeds": sorted(per[n]),
            "per_seed": values,
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "train_minutes": round(statistics.fmean(secs) / 60, 1) if secs else None,
            "seconds_per_iteration": round(statistics.fmean(secs) / CANDIDATES[n]["iterations"], 3) if secs else None,
            "nce_tail_change": statistics.fmean(r["nce_tail_change"] for r in runs) if runs else None,
            "vs_reference": paired(per[n], per[REFERENCE]) if n != REFERENCE and REFERENCE in per else None,
        }
    ranked = [n for n in names if rows[n]["mean"] is not None]
    best = max(ranked, key=lambda n: rows[n]["mean"]) if ranked else None
    shown = best not in (None, REFERENCE) and rows[best]["vs_reference"]["verdict"] == "shown"
    chosen = best if shown and rows[best]["vs_reference"]["mean"] > 0 else REFERENCE
    return {"rows": rows, "best_mean": best, "chosen": chosen, "reference": REFERENCE}


def markdown(summary: dict, variant: str, seeds: list[int]) -> str:
    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    lines = [
        f"Translator budget on target **validation** ({variant}, seeds {', '.join(map(str, seeds))}; frozen source "
        "detector models/source/model.pt; one thread per run). Rule fixed before the runs: the best mean replaces "
        f"the default ({REFERENCE}) only if its paired difference is shown.",
        "",
        "| candidate | seeds | val mAP (mean ± std) | per seed | vs default (95% t interval) | verdict "
        "| train min / run | s / it | PatchNCE last 10% vs the 10% before |",
        "|---|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for n, row in summary["rows"].items():
        vs = row["vs_reference"]
        diff = "-" if vs is None or vs["ci"] is None else f"{vs['mean']:+.2f} [{vs['ci'][0]:+.2f}, {vs['ci'][1]:+.2f}]"
        lines.append(
            f"| {n}: {DESCRIPTIONS[n]} | {len(row['seeds'])} | {f(row['mean'])} ± {f(row['std'])} "
            f"| {', '.join(f(v) for v in row['per_seed'])} | {diff} | {'-' if vs is None else vs['verdict']} "
            f"| {f(row['train_minutes'])} | {f(row['seconds_per_iteration'], '.3f')} "
            f"| {f(None if row['nce_tail_change'] is None else 100 * row['nce_tail_change'], '+.1f')}% |"
        )
    lines += ["", f"Highest mean: {summary['best_mean']}. Chosen by the rule: **{summary['chosen']}**."]
    return "\n".join(lines) + "\n"


def main(
    only: str = typer.Option("", help="Comma-separated candidate names (default: all)."),
    seeds: str = typer.Option("0-2", help="Seeds, e.g. 0-2 or 0,2."),
    variant: str = typer.Option("attention_lg", help="Translator variant (cut | attention | attention_lg)."),
    out: Path = typer.Option(Path("reports/bench/translator_budget"), help="Report folder."),
    work: Path = typer.Option(Path("models/translator_budget"), help="Models and logs of the runs (not committed)."),
    detector: Path = typer.Option(Path("models/source/model.pt"), help="The frozen source detector."),
    jobs: int = typer.Option(2, help="Runs at a time (one thread each)."),
) -> None:
    names = [n for n in (only.split(",") if only else CANDIDATES) if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise typer.BadParameter(f"unknown candidate(s) {unknown}; known: {', '.join(CANDIDATES)}")
    detector = next((d.resolve() for d in (detector, ROOT / detector) if d.is_file()), None) or detector
    if not detector.is_file():
        raise typer.BadParameter(f"{detector} not found: run `dvc repro pretrain` first.")
    seed_list = parse_seeds(seeds)
    # longest runs first, so two workers finish together
    order = sorted(((n, s) for n in names for s in seed_list), key=lambda t: -CANDIDATES[t[0]]["iterations"])
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda t: run_one(t[0], t[1], variant, work, detector), order))
    # a report covers every finished run of the study (earlier invocations with --only included)
    done = {(r["name"], r["seed"]): r for r in results}
    previous = out / "results.json"
    if previous.is_file():
        for r in json.loads(previous.read_text())["runs"]:
            if r["variant"] == variant:
                done.setdefault((r["name"], r["seed"]), r)
    runs = sorted(done.values(), key=lambda r: (list(CANDIDATES).index(r["name"]), r["seed"]))
    all_names = [n for n in CANDIDATES if any(r["name"] == n for r in runs)]
    all_seeds = sorted({r["seed"] for r in runs})
    summary = summarise(runs, all_names)
    write_json_atomic(out / "results.json", {"variant": variant, "runs": runs, "summary": summary})
    write_text_atomic(out / "results.md", markdown(summary, variant, all_seeds))
    typer.echo(markdown(summary, variant, all_seeds))


if __name__ == "__main__":
    typer.run(main)

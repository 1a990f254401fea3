"""Choose adaptation defaults on the labelled target *validation* split (never on target test).

Each variant is the committed ``params.yaml`` with some ``adapt`` keys overridden; it is adapted from the
pipeline's source model and memory (``models/source/model.pt``, ``models/memory/subsampled.h5``; run
``dvc repro subsample`` first) with ``stages/adapt.py`` and evaluated on ``data/benchmark/target_val``.
Runs go two at a time, each pinned to one thread (``OMP_NUM_THREADS=1``), so a rerun on the same machine
gives the same numbers. Output: ``reports/bench/tuning/results.{json,md}`` (mAP on validation, per-class AP,
and each run's diagnostics: discriminator accuracy, active triplets, gradient shares).

    python benchmarks/tune_adapt.py                       # every variant below
    python benchmarks/tune_adapt.py --only vspa_paper,bg_scaled4_both   # a subset; --seed 1 for the second seed
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# name -> adapt overrides (on top of params.yaml's adapt section and the scenario preset); every key this
# study varies is pinned, so a later change of a params.yaml default does not change a recorded variant
PINNED = {
    "fg_boxes": "teacher",
    "bg_warmup": 0,
    "diag_every": 25,
    "margin": 1.5,
    "lambda_fg": 0.05,
    "lambda_bg": 0.05,
    "tau": 0.8,
}
VARIANTS: dict[str, dict] = {
    "at_like": {**PINNED, "fg_mode": "off", "bg_mode": "off"},
    "vspa_paper": {**PINNED, "bg_form": "paper", "fg_negative": "random"},
    # first try: discriminator inputs x sqrt(1024) = 32 (overconfident discriminator, loss spikes)
    "bg_scaled32": {**PINNED, "bg_form": "scaled", "bg_scale": 32.0, "fg_negative": "random"},
    "bg_scaled32_hard": {**PINNED, "bg_form": "scaled", "bg_scale": 32.0, "fg_negative": "hard"},
    "bg_confusion32_both": {**PINNED, "bg_form": "confusion", "bg_scale": 32.0, "fg_negative": "both"},
    # inputs x 4
    "bg_scaled4_both": {**PINNED, "bg_form": "scaled", "bg_scale": 4.0, "fg_negative": "both"},
    "bg_confusion4_both": {**PINNED, "bg_form": "confusion", "bg_scale": 4.0, "fg_negative": "both"},
    "bg_confusion4_random": {**PINNED, "bg_form": "confusion", "bg_scale": 4.0, "fg_negative": "random"},
    "bg_confusion4_both_lbg0.01": {
        **PINNED,
        "bg_form": "confusion",
        "bg_scale": 4.0,
        "fg_negative": "both",
        "lambda_bg": 0.01,
    },
    "paper_bg_both": {**PINNED, "bg_form": "paper", "fg_negative": "both"},
}


def run_variant(name: str, overrides: dict, out_root: Path, seed: int) -> dict:
    """Adapt (unless ``<work>/model/model.pt`` and its diagnostics exist: a finished run is reused) and
    evaluate on target validation."""
    work = out_root / (name if seed == 0 else f"{name}_s{seed}")
    work.mkdir(parents=True, exist_ok=True)
    if (work / "model" / "model.pt").is_file() and (work / "logs" / "diagnostics.json").is_file():
        return evaluate_run(name, overrides, seed, work, seconds=None)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["adapt"].update(overrides)
    params["adapt"]["seed"] = seed
    params["adapt"]["device"] = "cpu"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    start = time.perf_counter()
    cmd = [
        sys.executable,
        str(ROOT / "stages" / "adapt.py"),
        "--params",
        str(work / "params.yaml"),
        "--name",
        f"tune_{name}".replace(".", "_"),
        "--out",
        str(work / "model"),
        "--log-dir",
        str(work / "logs"),
    ]
    with open(work / "adapt.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:  # e.g. diverged: recorded as a result, with the stage's last message
        last = [line for line in (work / "adapt.log").read_text().splitlines() if line.startswith("error")]
        return {"name": name, "overrides": overrides, "seed": seed, "failed": (last or ["see adapt.log"])[-1][:300]}
    return evaluate_run(name, overrides, seed, work, seconds=time.perf_counter() - start)


def evaluate_run(name: str, overrides: dict, seed: int, work: Path, seconds: float | None) -> dict:
    import torch

    from vspa.evaluation.runner import evaluate_model

    torch.set_num_threads(1)
    metrics, _ = evaluate_model(
        work / "model" / "model.pt", ROOT / "data/benchmark/target_val", "cpu", batch_size=8, progress=False
    )
    diag = json.loads((work / "logs" / "diagnostics.json").read_text())
    if "loss_bg" not in diag["second_half"]:  # runs made before the diagnostics had it: from the loss log
        import csv

        with open(work / "logs" / "losses.csv") as f:
            rows = list(csv.DictReader(f))
        half = [float(r["loss_bg"]) for r in rows[len(rows) // 2 :]]
        diag["second_half"]["loss_bg"] = round(sum(half) / len(half), 4) if any(half) else None
    summary = json.loads((work / "logs" / "summary.json").read_text())
    return {
        "name": name,
        "overrides": overrides,
        "seed": seed,
        "val_mAP": metrics["mAP"],
        "val_AP": metrics["AP"],
        "adapt_seconds": None if seconds is None else round(seconds, 1),
        "sec_per_iter": summary["sec_per_iter"],
        "diagnostics": diag,
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "# Adaptation variants on target validation",
        "",
        "Written by `python benchmarks/tune_adapt.py` (one thread per run, two runs at a time; the seed-0 source",
        "detector and memory of the pipeline; `seed` = adaptation seed). mAP = VOC AP50 on",
        "`data/benchmark/target_val` (300 foggy images, never trained on). Diagnostics: second half of training",
        "(discriminator accuracy, its loss (2 ln 2 = 1.386 at chance), active triplets, mean cosines, pseudo-label",
        "precision / recall against target-train labels); gradient shares: mean over the sampled iterations,",
        "relative to the supervised term. Variant keys: see `VARIANTS` in the script.",
        "",
        "| variant | seed | val mAP | bg disc acc | bg disc loss | img disc acc | active triplets | cos(a,p) "
        "| cos(a,n) | share fg | share bg | share img | pseudo prec / rec |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def f(v, pct=False):
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"

    for r in results:
        if "failed" in r:
            lines.append(f"| {r['name']} | {r['seed']} | failed: {r['failed'][:120]} |" + " |" * 10)
            continue
        d, s = r["diagnostics"]["second_half"], r["diagnostics"]["grad_share"]
        lines.append(
            f"| {r['name']} | {r['seed']} | {r['val_mAP']:.1f} | {f(d['bg_disc_acc'])} | {f(d.get('loss_bg'))} "
            f"| {f(d['img_disc_acc'])} "
            f"| {f(d['fg_active'])} | {f(d['cos_ap'])} | {f(d['cos_an'])} | {f(s['fg'], True)} | {f(s['bg'], True)} "
            f"| {f(s['img'], True)} | {f(d['pseudo_precision'])} / {f(d['pseudo_recall'])} |"
        )
    lines += [
        "",
        "Mean over the adaptation seeds run (a failed run is listed, not averaged):",
        "",
        "| variant | val mAP per seed | mean | bg disc acc | active triplets | share bg | pseudo precision |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r["name"] for r in results):
        runs = [r for r in results if r["name"] == name]
        done = [r for r in runs if "failed" not in r]
        per_seed = ", ".join(f"s{r['seed']} " + ("failed" if "failed" in r else f"{r['val_mAP']:.1f}") for r in runs)

        def mean(get):
            vals = [get(r) for r in done]
            vals = [v for v in vals if v is not None]
            return sum(vals) / len(vals) if vals else None

        m = mean(lambda r: r["val_mAP"])
        lines.append(
            f"| {name} | {per_seed} | {'-' if m is None else f'{m:.1f}'} "
            f"| {f(mean(lambda r: r['diagnostics']['second_half']['bg_disc_acc']))} "
            f"| {f(mean(lambda r: r['diagnostics']['second_half']['fg_active']))} "
            f"| {f(mean(lambda r: r['diagnostics']['grad_share']['bg']), True)} "
            f"| {f(mean(lambda r: r['diagnostics']['second_half']['pseudo_precision']))} |"
        )
    return "\n".join(lines) + "\n"


def main(
    only: str = typer.Option("", help="Comma-separated variant names (default: all)."),
    seed: int = typer.Option(0, help="Adaptation seed."),
    out: Path = typer.Option(Path("reports/bench/tuning"), help="Report folder."),
    work: Path = typer.Option(Path("models/tuning"), help="Models and logs of the runs (not committed)."),
    jobs: int = typer.Option(2, help="Runs at a time (one thread each)."),
) -> None:
    names = [n for n in only.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise typer.BadParameter(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "results.json"
    results = {(r["name"], r["seed"]): r for r in json.loads(previous.read_text())} if previous.is_file() else {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for r in pool.map(lambda n: run_variant(n, VARIANTS[n], ROOT / work, seed), names):
            results[(r["name"], r["seed"])] = r
            ordered = sorted(results.values(), key=lambda r: (list(VARIANTS).index(r["name"]), r["seed"]))
            (out / "results.json").write_text(json.dumps(ordered, indent=2) + "\n")
            (out / "results.md").write_text(markdown(ordered))
            print(
                f"{r['name']} seed {r['seed']}: "
                + (f"val mAP {r['val_mAP']:.1f} ({r['adapt_seconds']} s)" if "failed" not in r else r["failed"]),
                flush=True,
            )


if __name__ == "__main__":
    typer.run(main)

"""`make bench`: every row of the comparison table with several training seeds, mean and spread.

For each seed it writes a copy of params.yaml with every training seed set (pretrain, oracle, adapt,
subsample), runs the stage scripts with their output paths under ``models/bench/seed<S>`` and
``reports/bench/rows/seed<S>``, and finally writes ``reports/bench/rows.md`` and ``rows.json`` (mAP and
per-class AP: mean and sample standard deviation over seeds). The data split is the one of
``data/benchmark`` (run ``dvc repro prepare`` first); only the training seeds vary. A seed whose metrics
already exist is not run again, so an interrupted bench resumes.

    python benchmarks/bench_rows.py --seeds 0,1,2 [--rows source_on_target,at_like,vspa,oracle_on_target]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer
import yaml

from vspa.reporting.tables import ROW_DESCRIPTIONS
from vspa.utils import VspaError, run_stage, write_json_atomic, write_text_atomic

DATA = Path("data/benchmark")
ADAPT_ROWS = ("at_like", "vspa")


def _run(args: list[str]) -> None:
    print("+", " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, *args], check=True)


def _seed_params(base: Path, seed: int, out: Path) -> Path:
    params = yaml.safe_load(base.read_text())
    for section in ("pretrain", "oracle", "adapt", "subsample"):
        params.setdefault(section, {})["seed"] = seed
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, yaml.safe_dump(params, sort_keys=False))
    return out


def run_seed(seed: int, rows: list[str], params: Path) -> dict[str, dict]:
    models, reports = Path(f"models/bench/seed{seed}"), Path(f"reports/bench/rows/seed{seed}")
    metrics_dir = reports / "metrics"
    if all((metrics_dir / f"{r}.json").is_file() for r in rows):
        return {r: json.loads((metrics_dir / f"{r}.json").read_text()) for r in rows}
    p = str(_seed_params(params, seed, reports / "params.yaml"))
    source, oracle = models / "source/model.pt", models / "oracle/model.pt"
    t0 = time.time()
    _run(["stages/pretrain.py", "--params", p, "--out", str(source), "--log", str(reports / "pretrain_losses.csv"),
          "--work-dir", str(models / "source/work")])
    if "oracle_on_target" in rows:
        _run(["stages/oracle.py", "--params", p, "--out", str(oracle), "--log", str(reports / "oracle_losses.csv"),
              "--work-dir", str(models / "oracle/work")])
    memory = models / "memory/subsampled.h5"
    if any(r in rows for r in ADAPT_ROWS):
        _run(["stages/extract_memory.py", "--params", p, "--model", str(source), "--out", str(models / "memory/full.h5"),
              "--stats", str(reports / "extract.json")])
        _run(["stages/subsample.py", "--params", p, "--memory", str(models / "memory/full.h5"), "--out", str(memory),
              "--coverage", str(reports / "coverage.json")])
    for name in ADAPT_ROWS:
        if name in rows:
            _run(["stages/adapt.py", "--params", p, "--name", name, "--model", str(source), "--memory", str(memory),
                  "--out", str(models / "adapt" / name), "--log-dir", str(reports / "adapt" / name)])
    checkpoints = {"source_on_target": source, "source_on_source": source, "oracle_on_target": oracle,
                   **{n: models / "adapt" / n / "model.pt" for n in ADAPT_ROWS}}
    for row in rows:
        if row not in checkpoints:
            raise VspaError(f"--rows: unknown row '{row}'. Known: {', '.join(checkpoints)}.")
        split = "source_test" if row == "source_on_source" else "target_test"
        _run(["stages/evaluate.py", "--params", p, "--model", str(checkpoints[row]), "--data", str(DATA / split),
              "--name", row, "--metrics-dir", str(metrics_dir), "--plots-dir", str(reports / "pr")])
    print(f"seed {seed}: {time.time() - t0:.0f} s", file=sys.stderr)
    return {r: json.loads((metrics_dir / f"{r}.json").read_text()) for r in rows}


def summarise(results: dict[int, dict[str, dict]], rows: list[str]) -> dict:
    """mean and sample std (0 for one seed) of mAP and of each class's AP, per row."""
    out = {}
    for row in rows:
        per_seed = [results[s][row] for s in sorted(results)]
        classes = list(per_seed[0]["AP"])

        def stats(values: list[float]) -> dict:
            return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values}

        out[row] = {"mAP": stats([m["mAP"] for m in per_seed]),
                    "AP": {c: stats([m["AP"][c] for m in per_seed if m["AP"][c] is not None]) for c in classes}}
    return out


def render(summary: dict, seeds: list[int]) -> str:
    rows = list(summary)
    classes = list(summary[rows[0]]["AP"])
    lines = [f"AP50 on the target test split, mean ± std over seeds {', '.join(map(str, seeds))}.", "",
             "| Method | " + " | ".join(classes) + " | mAP |", "|---" * (len(classes) + 2) + "|"]
    for row in rows:
        cells = [f"{summary[row]['AP'][c]['mean']:.1f} ± {summary[row]['AP'][c]['std']:.1f}" for c in classes]
        m = summary[row]["mAP"]
        lines.append(f"| {ROW_DESCRIPTIONS.get(row, row)} | " + " | ".join(cells) + f" | {m['mean']:.1f} ± {m['std']:.1f} |")
    gap = gap_closed(summary)
    if gap:
        lines += ["", "Gap closed (mean mAP - source) / (oracle - source), from the means: "
                  + ", ".join(f"{ROW_DESCRIPTIONS.get(r, r).split(':')[0]} {g:.1f}%" for r, g in gap.items()) + "."]
    return "\n".join(lines) + "\n"


def gap_closed(summary: dict) -> dict[str, float]:
    """Percent of the source -> oracle gap closed by each adapted row, from the mean mAPs ({} without both ends)."""
    if "source_on_target" not in summary or "oracle_on_target" not in summary:
        return {}
    low, high = summary["source_on_target"]["mAP"]["mean"], summary["oracle_on_target"]["mAP"]["mean"]
    if high <= low:
        return {}
    return {r: 100.0 * (summary[r]["mAP"]["mean"] - low) / (high - low) for r in summary if r in ADAPT_ROWS}


def main(
    seeds: str = typer.Option("0,1,2", help="Comma-separated training seeds."),
    rows: str = typer.Option("source_on_target,at_like,vspa,oracle_on_target", help="Rows to run."),
    params: Path = typer.Option(Path("params.yaml"), help="Base params file."),
    out: Path = typer.Option(Path("reports/bench/rows"), help="Output folder of rows.md / rows.json."),
) -> None:
    def body() -> None:
        if not (DATA / "target_test" / "annotations.json").is_file():
            raise VspaError(f"{DATA}: no benchmark data. Run `dvc repro prepare` (or `make repro`) first.")
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        row_list = [r.strip() for r in rows.split(",") if r.strip()]
        results = {s: run_seed(s, row_list, params) for s in seed_list}
        summary = summarise(results, row_list)
        write_json_atomic(out / "rows.json", {"seeds": seed_list, "rows": summary, "gap_closed_pct": gap_closed(summary)})
        write_text_atomic(out / "rows.md", render(summary, seed_list))
        print((out / "rows.md").read_text())

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

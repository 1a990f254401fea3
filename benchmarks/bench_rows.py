"""`make bench`: every row of the comparison table over paired training seeds, with 95% confidence intervals.

A seed ``S`` fixes everything trained for it: the source detector (``pretrain.seed``), its memory
(``subsample.seed``), every adaptation run made from it (``adapt.seed``) and the oracle, so two rows of one
seed are a pair. Each seed is a chain of the pipeline's own stage scripts (pretrain -> extract_memory ->
subsample -> one adapt run per row -> evaluate on target test and on target validation), written under
``models/bench/seed<S>`` (models, logs) and ``reports/bench/rows/seed<S>`` (params, metrics). The data split
is the pipeline's ``data/benchmark`` (run ``dvc repro prepare`` first); only the training seeds vary.

Runs: ``--jobs`` chains at a time (default 2, one per core), every process pinned to ``--threads`` threads
(default 1: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``), recorded in ``rows.json``, so a rerun on the same
machine reproduces every number. A step whose output exists is not run again: an interrupted bench resumes.
The core rows (``--rows``) run for every seed of ``--seeds``; the extra rows (``--extra-rows``: MILA-like,
background only, oracle) for the seeds of ``--extra-seeds`` only.

Output (``--out``): ``rows.json`` and ``rows.md`` (per row: mean ± std and per-seed mAP; for every row against
AT-like and against fair source only: the paired mean difference, its 95% Student-t interval and the verdict
"shown" / "not shown"), the same on target validation in ``rows_val.md``, and ``diffs.png`` (per-seed
differences), ``budget_val.md`` (each adaptation run's teacher every ``--snapshot-every`` iterations, on
validation), and per seed ``seed<S>/``: ``params.yaml``, ``code.json`` (the commit), ``seconds.json``,
``diagnostics/`` (teacher drift) and the metrics. Tables are written after every finished seed.

    python benchmarks/bench_rows.py --seeds 0-17 --extra-seeds 0-2 [--jobs 2 --threads 1] [--snapshot-every 200]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vspa.config import effective_params  # noqa: E402
from vspa.reporting import seeds as seedstats  # noqa: E402
from vspa.reporting.tables import ROW_DESCRIPTIONS  # noqa: E402
from vspa.utils import VspaError, run_stage, write_json_atomic, write_text_atomic  # noqa: E402

DATA = Path("data/benchmark")  # --data
ADAPT_ROWS = ("fair_source", "at_like", "vspa", "mila_like", "bg_only")
ORDER = ("source_on_target", "fair_source", "at_like", "mila_like", "bg_only", "vspa", "oracle_on_target")
REFERENCES = ("at_like", "fair_source")
SPLITS = {"test": "target_test", "val": "target_val"}


def parse_seeds(text: str) -> list[int]:
    """'0-9' or '0,1,2' or '0-2,5' -> sorted seed list."""
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)


# the params sections a chain's stage scripts read (the translator's sections, for one, do not matter here)
BENCH_SECTIONS = (
    "scenario",
    "data",
    "prepare",
    "model",
    "pretrain",
    "oracle",
    "evaluate",
    "extract_memory",
    "subsample",
    "adapt",
    *(f"adapt_{row}" for row in ADAPT_ROWS),
)


def bench_view(params: dict) -> dict:
    """Effective values of the sections a seed's runs depend on: two params files that agree here give the same
    bench numbers."""
    merged = effective_params(params)
    return {k: merged.get(k) for k in BENCH_SECTIONS}


def code_version() -> dict:
    """The git commit the stage scripts run from, and whether the tree differs from it (recorded per seed)."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--", "src", "stages", "benchmarks")),
    }


class Chain:
    """One seed's runs; every command is a stage script in a child process pinned to ``threads`` threads."""

    def __init__(self, seed: int, rows: list[str], params: Path, out: Path, work: Path, threads: int, snapshot: int):
        self.seed, self.rows, self.threads, self.snapshot = seed, rows, threads, snapshot
        self.models, self.reports = work / f"seed{seed}", out / f"seed{seed}"
        self.params = self.reports / "params.yaml"
        base = yaml.safe_load(params.read_text())
        for section in ("pretrain", "oracle", "adapt", "subsample"):
            base.setdefault(section, {})["seed"] = seed
        for section in ("pretrain", "oracle", "adapt", "subsample", "evaluate", "extract_memory"):
            base.setdefault(section, {})["device"] = "cpu"
        base["adapt"]["snapshot_every"] = snapshot
        self.reports.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(base, sort_keys=False)
        # compared as effective values: a seed written before params.yaml was composed (nulls filled from the
        # scenario preset at run time) matches the composed file with the same values
        if (
            self.params.is_file()
            and self.params.read_text() != text
            and any(self.reports.glob("metrics*/*.json"))
            and bench_view(yaml.safe_load(self.params.read_text())) != bench_view(base)
        ):
            raise VspaError(
                f"{self.params}: seed {seed} was run with other params than {params} gives now; its "
                f"results would be mixed with new ones. Move {self.reports} (and {self.models}) away, "
                f"or restore those params."
            )
        write_text_atomic(self.params, text)
        self.seconds: dict[str, float] = {}

    def run(self, step: str, args: list[str], done: Path) -> None:
        if done.is_file():
            return
        log = self.models / "logs" / f"{step}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(self.threads),
            MKL_NUM_THREADS=str(self.threads),
            PYTHONPATH=str(ROOT / "src"),
        )
        env.pop("WORLD_SIZE", None)
        start = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run(
                [sys.executable, *args, "--params", str(self.params)],
                cwd=ROOT,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        if proc.returncode:
            tail = log.read_text().splitlines()[-5:]
            raise VspaError(f"seed {self.seed}, {step} failed (exit {proc.returncode}); see {log}:\n" + "\n".join(tail))
        self.seconds[step] = round(time.perf_counter() - start, 1)

    def finished(self) -> dict[str, dict[str, dict]] | None:
        """The seed's committed metrics when every row has them on test and validation (a fresh checkout
        without the models reuses them instead of training again), else None."""
        results: dict[str, dict[str, dict]] = {}
        for split_key in SPLITS:
            metrics_dir = self.reports / ("metrics" if split_key == "test" else f"metrics_{split_key}")
            if not all((metrics_dir / f"{row}.json").is_file() for row in self.rows):
                return None
            # every row the seed has, also those of an earlier call with more rows (its table keeps them)
            results[split_key] = {
                row: json.loads((metrics_dir / f"{row}.json").read_text())
                for row in ORDER
                if (metrics_dir / f"{row}.json").is_file()
            }
        for f in sorted((self.reports / "metrics_val_budget").glob("*.json")):
            results.setdefault("budget", {})[f.stem] = json.loads(f.read_text())
        return results

    def go(self) -> dict[str, dict[str, dict]]:
        done = self.finished()
        if done is not None:
            return done
        m, r = self.models, self.reports
        code = r / "code.json"  # which code made this seed's numbers (kept from the seed's first run)
        if not code.is_file():
            write_json_atomic(code, code_version())
        source, oracle, memory = m / "source/model.pt", m / "oracle/model.pt", m / "memory/subsampled.h5"

        def evaluated(row: str) -> bool:  # committed metrics on test and validation: nothing to train for it
            return all((r / d / f"{row}.json").is_file() for d in ("metrics", "metrics_val"))

        if not all(evaluated(row) for row in self.rows if row != "oracle_on_target"):
            self.run(
                "pretrain",
                [
                    "stages/train.py",
                    "--section",
                    "pretrain",
                    "--data",
                    str(DATA / "source_train"),
                    "--out",
                    str(source),
                    "--log-csv",
                    str(m / "logs/pretrain_losses.csv"),
                    "--work-dir",
                    str(m / "source/work"),
                ],
                source,
            )
        adapt_rows = [row for row in ADAPT_ROWS if row in self.rows and not evaluated(row)]
        if any(row in ("vspa", "mila_like", "bg_only") for row in adapt_rows):
            self.run(
                "extract_memory",
                [
                    "stages/extract_memory.py",
                    "--model",
                    str(source),
                    "--data",
                    str(DATA / "source_train"),
                    "--out",
                    str(m / "memory/full.h5"),
                    "--stats",
                    str(m / "logs/extract.json"),
                ],
                memory,
            )
            self.run(
                "subsample",
                [
                    "stages/subsample.py",
                    "--memory",
                    str(m / "memory/full.h5"),
                    "--out",
                    str(memory),
                    "--coverage",
                    str(m / "logs/coverage.json"),
                ],
                memory,
            )
        for row in adapt_rows:  # loss logs stay with the models; the small diagnostics are kept beside the metrics
            logs = m / "logs" / "adapt" / row
            self.run(
                f"adapt_{row}",
                [
                    "stages/adapt.py",
                    "--name",
                    row,
                    "--model",
                    str(source),
                    "--memory",
                    str(memory),
                    "--source",
                    str(DATA / "source_train"),
                    "--target",
                    str(DATA / "target_train"),
                    "--out",
                    str(m / "adapt" / row),
                    "--log-dir",
                    str(logs),
                ],
                m / "adapt" / row / "model.pt",
            )
            kept = r / "diagnostics" / f"{row}.json"
            if not kept.is_file():
                write_json_atomic(kept, json.loads((logs / "diagnostics.json").read_text()))
        if "oracle_on_target" in self.rows and not evaluated("oracle_on_target"):
            self.run(
                "oracle",
                [
                    "stages/train.py",
                    "--section",
                    "oracle",
                    "--data",
                    str(DATA / "target_train"),
                    "--out",
                    str(oracle),
                    "--log-csv",
                    str(m / "logs/oracle_losses.csv"),
                    "--work-dir",
                    str(m / "oracle/work"),
                ],
                oracle,
            )
        checkpoints = {
            "source_on_target": source,
            "oracle_on_target": oracle,
            **{row: m / "adapt" / row / "model.pt" for row in ADAPT_ROWS},
        }
        results: dict[str, dict[str, dict]] = {}
        for split_key, split in SPLITS.items():
            metrics_dir = r / ("metrics" if split_key == "test" else f"metrics_{split_key}")
            for row in self.rows:
                self.run(
                    f"evaluate_{row}_{split_key}",
                    [
                        "stages/evaluate.py",
                        "--model",
                        str(checkpoints[row]),
                        "--data",
                        str(DATA / split),
                        "--name",
                        row,
                        "--metrics-dir",
                        str(metrics_dir),
                        "--plots-dir",
                        str(m / "pr" / split_key),
                    ],
                    metrics_dir / f"{row}.json",
                )
                results.setdefault(split_key, {})[row] = json.loads((metrics_dir / f"{row}.json").read_text())
        # the iteration budget, judged on validation only: the teacher's snapshots of each adaptation run
        for row in adapt_rows:
            for snap in sorted((m / "adapt" / row / "work").glob("teacher_*.pt")):
                name = f"{row}@{snap.stem.split('_')[1]}"
                metrics_dir = r / "metrics_val_budget"
                self.run(
                    f"evaluate_{name}_val",
                    [
                        "stages/evaluate.py",
                        "--model",
                        str(snap),
                        "--data",
                        str(DATA / SPLITS["val"]),
                        "--name",
                        name,
                        "--metrics-dir",
                        str(metrics_dir),
                        "--plots-dir",
                        str(m / "pr" / "budget"),
                    ],
                    metrics_dir / f"{name}.json",
                )
        for f in sorted((r / "metrics_val_budget").glob("*.json")):  # this run's and earlier runs' snapshots
            results.setdefault("budget", {})[f.stem] = json.loads(f.read_text())
        if self.seconds:
            times = r / "seconds.json"
            old = json.loads(times.read_text()) if times.is_file() else {}
            write_json_atomic(times, {**old, **self.seconds})
        return results


def code_summary(out: Path, seeds: list[int]) -> str:
    """'seeds 0-3 at 1fe34d1; seeds 4-9 at ac4e4d8' from each seed's code.json."""
    groups: dict[str, list[int]] = {}
    for s in seeds:
        f = out / f"seed{s}" / "code.json"
        info = json.loads(f.read_text()) if f.is_file() else {}
        key = str(info.get("commit", "unknown"))[:7] + (" (tree differed)" if info.get("dirty") else "")
        groups.setdefault(key, []).append(s)
    return "; ".join(f"seed{'s' if len(v) > 1 else ''} {', '.join(map(str, v))} at {k}" for k, v in groups.items())


def write_tables(results: dict[int, dict], out: Path, meta: dict) -> dict:
    """rows.json, rows.md, rows_val.md and diffs.png from every finished seed."""
    rows = [r for r in ORDER if any(r in results[s]["test"] for s in results)]
    report = {
        **meta,
        "seeds_done": sorted(results),
        "code": {
            s: json.loads(f.read_text())
            for s in sorted(results)
            for f in [out / f"seed{s}" / "code.json"]
            if f.is_file()
        },
    }
    for split_key in SPLITS:
        summary = seedstats.summarise({s: results[s][split_key] for s in results}, rows, list(REFERENCES))
        report[split_key] = summary
        text = seedstats.render(summary, ROW_DESCRIPTIONS, split=SPLITS[split_key].replace("_", " "))
        head = (
            f"Written by `python benchmarks/bench_rows.py` ({meta['command']}): {meta['jobs']} runs at a time, "
            f"each pinned to {meta['threads']} thread(s), on {meta['machine']}; torch {meta['torch']}.\n"
            f"Code per seed (`seed<S>/code.json`): {code_summary(out, sorted(results))}.\n\n"
        )
        if split_key == "test":  # how often each method's teacher drifted, beside the means
            diags = {
                s: {
                    row: json.loads(f.read_text())
                    for f in sorted((out / f"seed{s}" / "diagnostics").glob("*.json"))
                    for row in [f.stem]
                }
                for s in results
            }
            drift = seedstats.teacher_drift(diags)
            report["teacher_drift"] = {row: drift[row] for row in ORDER if row in drift}
            text += seedstats.render_drift(report["teacher_drift"], ROW_DESCRIPTIONS)
        write_text_atomic(out / ("rows.md" if split_key == "test" else f"rows_{split_key}.md"), head + text)
        if split_key == "test":
            seedstats.plot_differences(summary, out / "diffs.png", ROW_DESCRIPTIONS)
    budget = {s: results[s].get("budget", {}) for s in results}
    names = sorted(
        {n for b in budget.values() for n in b}, key=lambda n: (ORDER.index(n.split("@")[0]), int(n.split("@")[1]))
    )
    if names:  # each row's snapshots beside its final model, on validation: mean, and paired against the final
        finals = {s: {**budget[s], **{f"{r}@final": m for r, m in results[s]["val"].items()}} for s in results}
        rows_b = [
            n
            for r in ORDER
            if any(x.startswith(f"{r}@") for x in names)
            for n in [*(x for x in names if x.startswith(f"{r}@")), f"{r}@final"]
        ]
        summary = seedstats.summarise(finals, rows_b, [])
        for r in [r for r in ORDER if any(n.startswith(f"{r}@") for n in names)]:  # fixed order, not a set's
            ref = summary["rows"].get(f"{r}@final")
            if ref:
                for n in (x for x in names if x.startswith(f"{r}@")):
                    summary["paired"].setdefault(f"{r}@final", {})[n] = seedstats.paired(
                        summary["rows"][n]["mAP"]["values"], ref["mAP"]["values"]
                    )
        report["budget_val"] = summary
        write_text_atomic(
            out / "budget_val.md",
            "Iteration budget on target validation: each adaptation run's teacher "
            "at the snapshot iterations and at the end (`@final`); paired against `@final`.\n\n"
            + seedstats.render(summary, {}, split="target validation"),
        )
    write_json_atomic(out / "rows.json", report)
    return report


def main(
    seeds: str = typer.Option("0-17", help="Seeds of the core rows: '0-17' or '0,1,2' (make bench: SEEDS)."),
    extra_seeds: str = typer.Option("0-2", help="Seeds that also run the extra rows."),
    rows: str = typer.Option("source_on_target,fair_source,at_like,vspa", help="Core rows (every seed)."),
    extra_rows: str = typer.Option("mila_like,bg_only,oracle_on_target", help="Extra rows (--extra-seeds only)."),
    params: Path = typer.Option(Path("params.yaml"), help="Base params file."),
    out: Path = typer.Option(Path("reports/bench/rows"), help="Folder of rows.md / rows.json and per-seed metrics."),
    work: Path = typer.Option(Path("models/bench"), help="Folder of the models and logs (not committed)."),
    jobs: int = typer.Option(2, help="Seed chains at a time."),
    threads: int = typer.Option(1, help="Threads per process (pinned; part of what a rerun must match)."),
    data: Path = typer.Option(DATA, help="The benchmark's split folders (the pipeline's prepare output)."),
    snapshot_every: int = typer.Option(
        200,
        help="Keep each adaptation run's teacher every N iterations and "
        "evaluate it on validation (the iteration budget study; 0 = off).",
    ),
) -> None:
    def body() -> None:
        import torch

        global DATA
        DATA = data.resolve()
        os.chdir(ROOT)
        for split in SPLITS.values():
            if not (DATA / split / "annotations.json").is_file():
                raise VspaError(f"{DATA / split}: missing. Run `dvc repro prepare` (or `make repro`) first.")
        core, extra = [r for r in rows.split(",") if r], [r for r in extra_rows.split(",") if r]
        unknown = sorted(set(core + extra) - set(ORDER))
        if unknown:
            raise VspaError(f"--rows / --extra-rows: unknown row(s) {unknown}. Known: {', '.join(ORDER)}.")
        seed_list, extra_list = parse_seeds(seeds), set(parse_seeds(extra_seeds))
        meta = {
            "command": " ".join(["bench_rows.py", *sys.argv[1:]]) or "bench_rows.py",
            "jobs": jobs,
            "threads": threads,
            "torch": torch.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.system()}",
        }
        start = time.perf_counter()
        results: dict[int, dict] = {}

        def one(seed: int) -> tuple[int, dict]:
            wanted = [r for r in ORDER if r in core or (seed in extra_list and r in extra)]
            return seed, Chain(seed, wanted, params, out, work, threads, snapshot_every).go()

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in as_completed([pool.submit(one, s) for s in seed_list]):
                seed, res = future.result()
                results[seed] = res  # as_completed hands results to this thread only: no lock needed
                meta["wall_seconds"] = round(time.perf_counter() - start, 1)
                report = write_tables(dict(sorted(results.items())), out, meta)
                d = report["test"]["paired"].get("at_like", {}).get("vspa")
                print(
                    f"seed {seed} done ({meta['wall_seconds']:.0f} s); VSPA - AT-like over {len(results)} seed(s): "
                    + ("-" if not d or d["mean"] is None else f"{d['mean']:+.2f}")
                    + ("" if not d or d["ci"] is None else f", 95% CI +-{d['half_width']:.2f}"),
                    flush=True,
                )
        print((out / "rows.md").read_text())

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

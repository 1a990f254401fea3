"""Measured cost of each real-data preset at its real image size: CPU seconds per iteration, peak RSS,
memory extraction rows/s, checkpoint sizes -> ``reports/bench/real_scale.{json,md}``.

For every scenario, in a temporary git + DVC repository set up as ``make smoke-real`` does (the preset's real
folder layout and image size from :func:`vspa.data.smoke.write_fixture`, a randomly initialised backbone of the
preset's architecture, this project's ``dvc.yaml``): ``pretrain`` and ``adapt@vspa`` run at the preset's own
batch size (4 source + 4 target images per iteration; ``--adapt-batch 2`` for 2 + 2, as the committed table) for 1 and then for ``--iterations`` iterations, each from
scratch (``dvc repro -s``), inside a wrapper process that reads its children's ``getrusage``. Seconds per
iteration = (CPU seconds of the long run - CPU seconds of the 1-iteration run) / (iterations - 1), so the start
(imports, model build, data index, memory load) cancels out; CPU seconds (user + system), not wall time, so the
figure does not depend on what else the machine runs. Peak RSS is that of the long run. Every process is pinned
to ``--threads`` threads (default 1). Memory extraction: rows (foreground + background entries) per second of
the stage's own timer. Checkpoint sizes: the files the stages wrote.

The figures are measured, not scaled: nothing here multiplies a small-image time up to the real size. What a
GPU node will take is not measured here (see ``make gpu-check``).

    python benchmarks/real_scale.py [--scenarios cityscapes_foggy] [--iterations 3] [--threads 1] [--adapt-batch 2]
"""

from __future__ import annotations

import json
import os
import platform
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from smoke_real import project_copy, repo_env, smoke_params  # noqa: E402
from vspa.config import load_preset  # noqa: E402
from vspa.data.smoke import SCENARIOS, write_fixture, write_random_weights  # noqa: E402
from vspa.utils import VspaError, run_stage, write_json_atomic, write_text_atomic  # noqa: E402

# Runs `argv` (in `cwd`, env from the parent) and prints the children's CPU seconds and peak RSS as JSON.
WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:])\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print('RUSAGE ' + json.dumps({'rc': code, 'cpu_s': r.ru_utime + r.ru_stime, 'maxrss_mib': r.ru_maxrss / 1024}))\n"
)


def measured(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run ``cmd`` under the rusage wrapper; its output goes to ``log``; returns cpu_s, maxrss_mib, wall_s."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(
            [sys.executable, "-c", WRAPPER, *cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=f, text=True
        )
        f.write(proc.stdout)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RUSAGE ")]
    result = json.loads(line[-1][len("RUSAGE ") :]) if line else {"rc": proc.returncode}
    if proc.returncode or result.get("rc"):
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise VspaError(f"real-scale: `{' '.join(cmd)}` failed in {cwd} (see {log}):\n{tail}")
    result["wall_s"] = time.perf_counter() - start
    return result


def set_params(repo: Path, section: str, values: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def mib(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 1)


def run_scenario(scenario: str, work: Path, iterations: int, threads: int, adapt_batch: int | None = None) -> dict:
    repo = project_copy(work / scenario)
    preset = load_preset(scenario)
    batch = {
        "pretrain": int(preset["pretrain"]["batch_size"]),
        "adapt": adapt_batch or int(preset["adapt"]["batch_size"]),
    }
    data_root = write_fixture(scenario, repo / "datasets", per_split=max(batch.values()))
    backbone = preset["model"]["backbone"]
    weights = write_random_weights(backbone, repo / "weights" / f"{backbone}_random.pth")
    params = smoke_params(scenario, data_root, weights, 1, "cpu")
    params["pretrain"]["batch_size"] = batch["pretrain"]
    # no refresh, no checkpoint and no gradient-share diagnostics inside the window: the plain iteration
    params["adapt"].update(batch_size=batch["adapt"], refresh_every=0, checkpoint_every=1000, diag_every=0)
    if scenario == "sim10k_cityscapes":
        params["prepare"]["splits"]["source_test"]["sample"] = batch["pretrain"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = repo_env(repo, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = work / f"{scenario}.log"
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "bench@example.com"],
        ["git", "config", "user.name", "bench"],
        ["dvc", "init", "-q"],
    ):
        subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    measured(["dvc", "repro", "prepare"], repo, env, log)

    out = {
        "scenario": scenario,
        "backbone": backbone,
        "min_size": preset["model"]["min_size"],
        "max_size": preset["model"]["max_size"],
        "batch": batch,
        "iterations": iterations,
        "threads": threads,
    }
    for stage, section, work_dir in (
        ("pretrain", "pretrain", "models/source/work"),
        ("adapt@vspa", "adapt", "models/adapt/vspa/work"),
    ):
        runs = {}
        for its in (1, iterations):
            set_params(repo, section, {"iterations": its})
            shutil.rmtree(repo / work_dir, ignore_errors=True)  # from scratch, not resumed
            runs[its] = measured(["dvc", "repro", "-s", stage], repo, env, log)
        per_it = (runs[iterations]["cpu_s"] - runs[1]["cpu_s"]) / (iterations - 1)
        out[stage] = {
            "cpu_s_per_iteration": round(per_it, 2),
            "peak_rss_mib": round(runs[iterations]["maxrss_mib"]),
            "cpu_s_1_iteration_run": round(runs[1]["cpu_s"], 1),
            f"cpu_s_{iterations}_iteration_run": round(runs[iterations]["cpu_s"], 1),
        }
        if stage == "pretrain":  # the memory stages need the source model
            extract = measured(["dvc", "repro", "-s", "extract_memory"], repo, env, log)
            stats = json.loads((repo / "reports" / "memory" / "extract.json").read_text())
            rows = int(stats["fg_rows"]) + int(stats["bg_rows"])
            seconds = float(stats.get("seconds") or stats["images"] / stats["images_per_s"])
            out["extract_memory"] = {
                "images": stats["images"],
                "rows": rows,
                "seconds": round(seconds, 1),
                "rows_per_s": round(rows / seconds, 1),
                "images_per_s": round(float(stats["images_per_s"]), 2),
                "peak_rss_mib": round(extract["maxrss_mib"]),
            }
            measured(["dvc", "repro", "-s", "subsample"], repo, env, log)
    out["checkpoint_mib"] = {
        "source model": mib(repo / "models/source/model.pt"),
        "adapted model": mib(repo / "models/adapt/vspa/model.pt"),
        "adapt resumable state": mib(repo / "models/adapt/vspa/work/last.pt")
        if (repo / "models/adapt/vspa/work/last.pt").is_file()
        else None,
        "memory (full)": mib(repo / "models/memory/full.h5"),
        "memory (subsampled)": mib(repo / "models/memory/subsampled.h5"),
    }
    return out


def render(results: list[dict], meta: dict) -> str:
    lines = [
        f"Measured on {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s) per process, "
        f"command `{meta['command']}` ({meta['wall_s']:.0f} s). CPU seconds (user + system) per iteration at the "
        "preset's real image size and the batch in the table (the preset's for pretrain), from the difference of a 1-iteration and an "
        f"N-iteration run; peak RSS of the N-iteration run. Random backbone weights of the right architecture on "
        "the smoke fixtures (a few images per split in the real layout and size). Adaptation runs with tau 0 (random "
        "weights give no confident detection), so each image's 100 detections are all pseudo-labels: a worst case "
        "for that count; gradient-share diagnostics, memory refreshes and checkpoints are off in the window.\n",
        "| scenario | backbone | resize | batch (src / src+tgt) | pretrain CPU s/it | pretrain peak RSS (MiB) | "
        "VSPA adapt CPU s/it | adapt peak RSS (MiB) | extraction rows/s (images/s) | source ckpt (MiB) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        e = r["extract_memory"]
        lines.append(
            f"| {r['scenario']} | {r['backbone']} | {r['min_size']} / {r['max_size']} | "
            f"{r['batch']['pretrain']} / {r['batch']['adapt']}+{r['batch']['adapt']} | "
            f"{r['pretrain']['cpu_s_per_iteration']} | {r['pretrain']['peak_rss_mib']} | "
            f"{r['adapt@vspa']['cpu_s_per_iteration']} | {r['adapt@vspa']['peak_rss_mib']} | "
            f"{e['rows_per_s']} ({e['images_per_s']}) | {r['checkpoint_mib']['source model']} |"
        )
    lines += [
        "",
        "Checkpoint and memory file sizes (MiB):",
        "",
        "| scenario | " + " | ".join(results[0]["checkpoint_mib"]) + " |",
        "|---|" + "---:|" * len(results[0]["checkpoint_mib"]),
    ]
    for r in results:
        lines.append(f"| {r['scenario']} | " + " | ".join(str(v) for v in r["checkpoint_mib"].values()) + " |")
    return "\n".join(lines) + "\n"


def main(
    scenarios: str = typer.Option(",".join(SCENARIOS), help="Comma-separated real-data presets."),
    iterations: int = typer.Option(2, help="Iterations of the long run (>= 2); the short run has 1."),
    threads: int = typer.Option(1, help="Threads per process (OMP_NUM_THREADS / MKL_NUM_THREADS)."),
    adapt_batch: int = typer.Option(
        None,
        help="Source (and target) images per adaptation iteration (default: the "
        "preset's; on a 24 GB machine 4+4 at real size exceeds memory).",
    ),
    out: Path = typer.Option(Path("reports/bench"), help="Folder of real_scale.{json,md}."),
    keep: Path = typer.Option(None, help="Keep the temporary repositories here (default: deleted)."),
) -> None:
    def body() -> None:
        import torch

        if iterations < 2:
            raise VspaError("--iterations must be >= 2 (the per-iteration time is a difference against 1).")
        names = [s for s in scenarios.split(",") if s]
        unknown = sorted(set(names) - set(SCENARIOS))
        if unknown:
            raise VspaError(f"--scenarios: unknown {unknown}; known: {', '.join(SCENARIOS)}.")
        start = time.perf_counter()
        work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="vspa_real_scale_"))
        results = []
        try:
            for scenario in names:
                results.append(run_scenario(scenario, work, iterations, threads, adapt_batch))
                print(f"[real-scale] {scenario}: {json.dumps(results[-1])}", flush=True)
                write_json_atomic(out / "real_scale.partial.json", results)
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
        meta = {
            "command": " ".join(["python benchmarks/real_scale.py", *sys.argv[1:]]),
            "threads": threads,
            "torch": torch.__version__,
            "wall_s": round(time.perf_counter() - start, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, no GPU used",
        }
        write_json_atomic(out / "real_scale.json", {"meta": meta, "results": results})
        (out / "real_scale.partial.json").unlink(missing_ok=True)
        write_text_atomic(out / "real_scale.md", render(results, meta))
        print(render(results, meta))

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

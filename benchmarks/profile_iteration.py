"""Where the time of one training iteration goes: a profile of ``pretrain`` and of a VSPA ``adapt`` iteration,
broken down by phase -> ``reports/bench/iteration.{json,md}``.

In a temporary folder, on the pipeline's ``data/benchmark`` splits (run ``dvc repro prepare`` first) and the
committed ``params.yaml`` (default scenario): the ``pretrain`` stage script runs ``--pretrain-iterations``
iterations, ``extract_memory`` and ``subsample`` build a memory from that detector, and the ``adapt`` stage
script (VSPA: both memory alignments, image-level discriminator, EMA teacher) runs ``--adapt-iterations``
iterations with no memory refresh and no checkpoint inside the window. The two training stages run under
``cProfile``; the phase of a call is the innermost of the functions below on its stack (cumulative time of those
functions, minus that of nested phases), reported per iteration and as a share of the stage's training loop.
Every process is pinned to ``--threads`` threads. cProfile adds overhead to Python-heavy code (the share of the
Python-level phases is somewhat overstated); the absolute seconds are for ranking, not for speed claims.

    python benchmarks/profile_iteration.py [--pretrain-iterations 40] [--adapt-iterations 30] [--threads 1]
"""

from __future__ import annotations

import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vspa.utils import VspaError, run_stage, write_json_atomic, write_text_atomic  # noqa: E402

# phase -> (file suffix, function name) entries; the loop is the denominator
PHASES = {
    "pretrain": {
        "loop": [("detection/train.py", "train_detector")],
        "data (read, augment)": [("detection/train.py", "_augment"), ("data/coco.py", "__getitem__")],
        "forward (backbone, RPN, ROI heads, losses)": [
            ("detection/model.py", "forward"),
            ("detection/model.py", "supervised_losses"),
        ],
        "backward": [("torch/_tensor.py", "backward")],
        "optimiser step": [("torch/optim/sgd.py", "step")],
        "checkpoint": [("detection/train.py", "save_state")],
    },
    "adapt": {
        "loop": [("adaptation/trainer.py", "adapt")],
        "data (read, views, collate)": [("adaptation/data.py", "_batch")],
        "teacher (pseudo-labels)": [("adaptation/teacher.py", "teacher_detect")],
        "student forward: source supervised": [("detection/model.py", "supervised_losses")],
        "student forward: backbone passes": [("detection/model.py", "backbone_features")],
        "alignment (retrieval, triplet, background)": [("adaptation/step.py", "_alignment_losses")],
        "image discriminator": [("adaptation/losses.py", "adversarial_terms")],
        "backward": [("torch/_tensor.py", "backward")],
        "optimiser step": [("torch/optim/sgd.py", "step")],
        "EMA update": [("adaptation/teacher.py", "ema_update")],
        "diagnostics (gradient shares, pseudo-label precision)": [("adaptation/diagnostics.py", "")],
        "checkpoint": [("utils.py", "save_torch_atomic")],
    },
}


def _match(key: tuple, entries) -> bool:
    file, _, name = key
    return any(file.replace(os.sep, "/").endswith(f) and (not fn or name == fn) for f, fn in entries)


def phase_times(prof_path: Path, phases: dict) -> dict:
    """Cumulative seconds of each phase's functions (summed over matching functions)."""
    stats = pstats.Stats(str(prof_path)).stats  # key -> (cc, nc, tt, ct, callers)
    out = {}
    for phase, entries in phases.items():
        matching = [k for k in stats if _match(k, entries)]
        if phase.startswith("diagnostics"):  # a module: count its top-level entry points only
            matching = [k for k in matching if not any(_match(c, entries) for c in stats[k][4])]
        out[phase] = sum(stats[k][3] for k in matching)
    return out


def main(
    pretrain_iterations: int = typer.Option(40, help="Profiled pretrain iterations."),
    adapt_iterations: int = typer.Option(30, help="Profiled adaptation iterations."),
    threads: int = typer.Option(1, help="Threads per process."),
    data: Path = typer.Option(Path("data/benchmark"), help="The benchmark's splits (prepare's output)."),
    out: Path = typer.Option(Path("reports/bench"), help="Folder of iteration.{json,md}."),
) -> None:
    def body() -> None:
        import torch

        for split in ("source_train", "target_train"):
            if not (data / split / "annotations.json").is_file():
                raise VspaError(f"{data / split}: missing. Run `dvc repro prepare` first.")
        work = Path(tempfile.mkdtemp(prefix="vspa_profile_"))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "src"))
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        for section in ("pretrain", "adapt", "extract_memory", "subsample", "evaluate"):
            params[section]["device"] = "cpu"
        params["pretrain"].update(iterations=pretrain_iterations, checkpoint_every=10**6)
        params["adapt"].update(iterations=adapt_iterations, refresh_every=0, checkpoint_every=10**6)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        p = ["--params", str(work / "params.yaml")]

        def run(script: str, args: list[str], profile: Path | None = None) -> None:
            cmd = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else []) + [script, *p, *args]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise VspaError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")

        try:
            run(
                "stages/train.py",
                [
                    "--section",
                    "pretrain",
                    "--data",
                    str(data / "source_train"),
                    "--out",
                    str(work / "source.pt"),
                    "--log-csv",
                    str(work / "pretrain.csv"),
                    "--work-dir",
                    str(work / "pw"),
                ],
                work / "pretrain.prof",
            )
            run(
                "stages/extract_memory.py",
                [
                    "--model",
                    str(work / "source.pt"),
                    "--data",
                    str(data / "source_train"),
                    "--out",
                    str(work / "full.h5"),
                    "--stats",
                    str(work / "extract.json"),
                ],
            )
            run(
                "stages/subsample.py",
                [
                    "--memory",
                    str(work / "full.h5"),
                    "--out",
                    str(work / "sub.h5"),
                    "--coverage",
                    str(work / "coverage.json"),
                ],
            )
            run(
                "stages/adapt.py",
                [
                    "--name",
                    "vspa",
                    "--model",
                    str(work / "source.pt"),
                    "--source",
                    str(data / "source_train"),
                    "--target",
                    str(data / "target_train"),
                    "--memory",
                    str(work / "sub.h5"),
                    "--out",
                    str(work / "adapt"),
                    "--log-dir",
                    str(work / "adapt_logs"),
                ],
                work / "adapt.prof",
            )
            result = {
                "command": " ".join(["python benchmarks/profile_iteration.py", *sys.argv[1:]]),
                "threads": threads,
                "torch": torch.__version__,
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "stages": {},
            }
            for stage, its in (("pretrain", pretrain_iterations), ("adapt", adapt_iterations)):
                times = phase_times(work / f"{stage}.prof", PHASES[stage])
                loop = times.pop("loop")
                result["stages"][stage] = {
                    "iterations": its,
                    "loop_s_per_it": loop / its,
                    "phases_s_per_it": {k: v / its for k, v in times.items()},
                    "phases_share": {k: v / loop for k, v in times.items()},
                }
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write_json_atomic(out / "iteration.json", result)
        lines = [
            f"Profile of one training iteration (cProfile; `{result['command']}`; {result['machine']}, "
            f"{threads} thread(s), torch {result['torch']}). Phase = cumulative time of the listed functions "
            "(nested phases are not subtracted: the backbone passes are inside the student forward).",
            "",
        ]
        for stage, r in result["stages"].items():
            lines += [
                f"**{stage}** ({r['iterations']} iterations, {r['loop_s_per_it']:.3f} s per iteration of the "
                "loop under the profiler):",
                "",
                "| phase | s / iteration | share of the loop |",
                "|---|---:|---:|",
            ]
            for phase, sec in sorted(r["phases_s_per_it"].items(), key=lambda kv: -kv[1]):
                lines.append(f"| {phase} | {sec:.3f} | {100 * r['phases_share'][phase]:.0f}% |")
            lines.append("")
        write_text_atomic(out / "iteration.md", "\n".join(lines))
        print("\n".join(lines))

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

"""Seconds per training iteration of two versions of the code, timed in one run, side by side
-> ``reports/bench/bench_iteration.{json,md}``.

Both versions are git revisions, unpacked with ``git archive`` into a temporary folder: the old one defaults to
``050fbb5`` (where issue 16 measured 0.166 s per pretrain iteration and 0.359 s per VSPA adaptation iteration),
the new one to ``HEAD`` (commit what you want timed: edits made to the checkout while the benchmark runs do not
leak into it). Each version runs its own stage scripts with
its own ``params.yaml`` (default scenario), changed only in the iteration counts, ``device: cpu``, no
checkpoint and no memory refresh inside the window:

- ``stages/train.py --section pretrain`` (``stages/pretrain.py`` in older versions) on ``data/benchmark/source_train``;
- ``stages/adapt.py --name vspa`` from the committed source detector (``models/source/model.pt``) and memory
  (``models/memory/subsampled.h5``), so both versions adapt the same model with the same memory.

A stage's seconds per iteration are ``(T(long) - T(short)) / (long - short)`` from the wall times of two runs
of it (start-up, data loading and the final save cancel out). The versions alternate within each repetition
(old, new, old, new, ...) after one untimed warm-up run of each, every process pinned to ``--threads`` threads,
and the median over repetitions is reported with the ratio old / new, and the median of the per-repetition
ratios ("paired"). ``--new-amp`` runs the new version with ``amp: true``; ``--old HEAD --new HEAD --new-amp``
thus times mixed precision against float32 on the same code. ``--old-data-workers`` / ``--new-data-workers``
set ``VSPA_DATA_WORKERS`` (the data threads of ``vspa.training.prefetch``) for one version's processes, and
``--device cuda`` runs both on a GPU: ``--old HEAD --new HEAD --device cuda --old-data-workers 0`` times the
data threads against none on a GPU node. Run it alone: other jobs on the machine inflate both versions, not
necessarily by the same factor.

    python benchmarks/bench_iteration.py [--old 050fbb5] [--new HEAD] [--reps 5] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vspa.utils import VspaError, run_stage, write_json_atomic, write_text_atomic  # noqa: E402


def unpack_revision(rev: str, dest: Path) -> str:
    """``git archive rev`` unpacked into ``dest``; returns the full commit hash."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True, text=True
    )
    if commit.returncode:
        raise VspaError(f"bench_iteration: '{rev}' is not a commit of {ROOT} ({commit.stderr.strip()}).")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit.stdout.strip()], cwd=ROOT, capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return commit.stdout.strip()


def timing_params(
    tree: Path, out: Path, pretrain_its: int, adapt_its: int, amp: bool = False, device: str = "cpu"
) -> Path:
    """The tree's own params.yaml with the window's iteration counts, ``device``, no checkpoint and no refresh;
    ``amp`` sets ``amp: true`` (mixed precision: bfloat16 autocast on the CPU) in pretrain and adapt."""
    params = yaml.safe_load((tree / "params.yaml").read_text())
    params["pretrain"].update(iterations=pretrain_its, checkpoint_every=10**6, device=device)
    params["adapt"].update(iterations=adapt_its, checkpoint_every=10**6, refresh_every=0, device=device)
    if amp:
        params["pretrain"]["amp"] = params["adapt"]["amp"] = True
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return out


def checkpoint_for(tree: Path, checkpoint: Path, dest: Path, env: dict) -> Path:
    """``checkpoint`` as ``tree``'s code reads it: config keys that version's ``DetectorConfig`` lacks are dropped
    (an older version refuses them; they were added later with the old behaviour as their default)."""
    import torch

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import dataclasses, json; from vspa.detection.model import "
            "DetectorConfig; print(json.dumps([f.name for f in dataclasses.fields(DetectorConfig)]))",
        ],
        cwd=tree,
        env=dict(env, PYTHONPATH=str(tree / "src")),
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise VspaError(f"bench_iteration: cannot read DetectorConfig in {tree}:\n{proc.stderr[-2000:]}")
    known = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    dropped = sorted(set(ckpt["config"]) - known)
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k in known}
    torch.save(ckpt, dest)
    if dropped:
        print(f"[bench_iteration] {tree.name}: checkpoint config keys dropped: {', '.join(dropped)}", file=sys.stderr)
    return dest


def paired_speedup(seconds: dict, stage: str) -> float:
    """Median over repetitions of old / new within a repetition: the two versions of one repetition run back to
    back (about a minute apart), so this machine's drift of 10-30% between minutes cancels better than in the
    ratio of the two medians."""
    return statistics.median(o / n for o, n in zip(seconds["old"][stage], seconds["new"][stage]))


def markdown(result: dict) -> str:
    """``bench_iteration.md`` from the ``bench_iteration.json`` dict."""
    seconds, windows = result["seconds_per_iteration"], result["windows"]
    old, new = result["old"], result["new"]

    def workers(version: dict) -> str:
        n = version.get("data_workers")
        return "" if n is None else f", {n} data thread{'' if n == 1 else 's'}"

    lines = [
        f"Seconds per training iteration, old ({old['revision']} = {old['commit'][:7]}{workers(old)}) and new "
        f"({new['revision']} = {new['commit'][:7]}{', amp: true (bfloat16 autocast)' if new.get('amp') else ''}"
        f"{workers(new)}) code timed in one run on {result.get('device', 'cpu')} "
        f"(`{result['command']}`; {result['machine']}, {result['threads']} thread(s) per process, torch "
        f"{result['torch']}). Per stage: (T(long) - T(short)) / (long - short) over two runs of its stage "
        f"script; versions alternate within each repetition; median of {result['reps']}. Paired: the median of "
        "the per-repetition ratios old / new (each repetition runs both versions back to back).",
        "",
        "| stage | old s/it | new s/it | speed-up (old / new) | paired speed-up | per repetition old | per repetition new |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    labels = {
        "pretrain": "pretrain (batch 4, {}->{} its)",
        "adapt": "adapt VSPA (2+2 images, {}->{} its)",
    }
    for stage, (short, long) in windows.items():
        med = result["median"][stage]
        lines.append(
            f"| {labels[stage].format(short, long)} | {med['old']:.3f} | {med['new']:.3f} | "
            f"{result['speedup'][stage]:.2f}x | {paired_speedup(seconds, stage):.2f}x | "
            f"{', '.join(f'{s:.3f}' for s in seconds['old'][stage])} | "
            f"{', '.join(f'{s:.3f}' for s in seconds['new'][stage])} |"
        )
    return "\n".join(lines) + "\n"


def main(
    old: str = typer.Option("050fbb5", help="The old version: a git revision."),
    new: str = typer.Option("HEAD", help="The new version: a git revision."),
    reps: int = typer.Option(5, min=1, help="Repetitions (median reported)."),
    threads: int = typer.Option(2, min=1, help="Threads per process (OMP_NUM_THREADS, torch)."),
    pretrain_short: int = typer.Option(10, min=1, help="Pretrain iterations of the short run."),
    pretrain_long: int = typer.Option(60, min=2, help="Pretrain iterations of the long run."),
    adapt_short: int = typer.Option(5, min=1, help="Adaptation iterations of the short run."),
    adapt_long: int = typer.Option(
        55,
        min=2,
        help="Adaptation iterations of the long run (5 -> 55 holds two of the gradient-share iterations, 1 in 25, as a whole run does).",
    ),
    data: Path = typer.Option(Path("data/benchmark"), help="The benchmark's splits (prepare's output)."),
    model: Path = typer.Option(Path("models/source/model.pt"), help="Source detector both versions adapt."),
    memory: Path = typer.Option(Path("models/memory/subsampled.h5"), help="Memory both versions adapt with."),
    out: Path = typer.Option(Path("reports/bench"), help="Folder of bench_iteration.{json,md}."),
    new_amp: bool = typer.Option(
        False, help="Time the new version with amp: true (bfloat16 autocast on the CPU) in pretrain and adapt."
    ),
    device: str = typer.Option("cpu", help="cpu, or cuda / cuda:N on a GPU node."),
    old_data_workers: int = typer.Option(
        None, min=0, help="VSPA_DATA_WORKERS for the old version (data threads; default: the version's own)."
    ),
    new_data_workers: int = typer.Option(None, min=0, help="VSPA_DATA_WORKERS for the new version."),
) -> None:
    def body() -> None:
        import torch

        if pretrain_long <= pretrain_short or adapt_long <= adapt_short:
            raise VspaError("bench_iteration: each long run needs more iterations than its short run.")
        for path in (
            data / "source_train" / "annotations.json",
            data / "target_train" / "annotations.json",
            model,
            memory,
        ):
            if not (ROOT / path).is_file():
                raise VspaError(f"{path}: missing. Run `dvc repro subsample` (or `make repro`) first.")
        work = Path(tempfile.mkdtemp(prefix="vspa_bench_iteration_"))
        try:
            old_commit = unpack_revision(old, work / "old")
            new_commit = unpack_revision(new, work / "new")
            trees = {"old": work / "old", "new": work / "new"}
            env_base = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            env_base.pop("VSPA_DATA_WORKERS", None)  # an option left unset: the version's own default, not the shell's
            data_workers = {"old": old_data_workers, "new": new_data_workers}
            windows = {"pretrain": (pretrain_short, pretrain_long), "adapt": (adapt_short, adapt_long)}
            models = {v: checkpoint_for(t, ROOT / model, work / f"{v}_model.pt", env_base) for v, t in trees.items()}
            seconds: dict[str, dict[str, list[float]]] = {v: {"pretrain": [], "adapt": []} for v in trees}

            def timed(version: str, stage: str, its: int, run_dir: Path) -> float:
                tree = trees[version]
                run_dir.mkdir(parents=True)
                p_its = its if stage == "pretrain" else pretrain_short
                a_its = its if stage == "adapt" else adapt_short
                params = timing_params(
                    tree, run_dir / "params.yaml", p_its, a_its, amp=new_amp and version == "new", device=device
                )
                if stage == "pretrain":
                    script = (
                        ["stages/train.py", "--section", "pretrain"]
                        if (tree / "stages/train.py").is_file()
                        else ["stages/pretrain.py"]
                    )  # one script for pretrain and oracle since issue 15
                    # --log-csv since the command had to pass torchrun's parser (--log abbreviates its options)
                    log_option = "--log-csv" if "--log-csv" in (tree / script[0]).read_text() else "--log"
                    args = [
                        *script,
                        "--params",
                        str(params),
                        "--data",
                        str(ROOT / data / "source_train"),
                        "--out",
                        str(run_dir / "model.pt"),
                        log_option,
                        str(run_dir / "losses.csv"),
                        "--work-dir",
                        str(run_dir / "work"),
                    ]
                else:
                    args = [
                        "stages/adapt.py",
                        "--params",
                        str(params),
                        "--name",
                        "vspa",
                        "--model",
                        str(models[version]),
                        "--source",
                        str(ROOT / data / "source_train"),
                        "--target",
                        str(ROOT / data / "target_train"),
                        "--memory",
                        str(ROOT / memory),
                        "--out",
                        str(run_dir / "adapt"),
                        "--log-dir",
                        str(run_dir / "logs"),
                    ]
                env = dict(env_base, PYTHONPATH=str(tree / "src"))
                workers = data_workers[version]
                if workers is not None:
                    env["VSPA_DATA_WORKERS"] = str(workers)
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True)
                elapsed = time.perf_counter() - start
                if proc.returncode:
                    raise VspaError(
                        f"bench_iteration: {version} {stage} ({its} iterations) failed in {tree}:\n"
                        f"{proc.stderr[-3000:]}"
                    )
                return elapsed

            # one untimed short run per version and stage first: the first run of a stage reads the model, memory
            # and images from disk and fills caches (once 25 s instead of 7 s for 5 adaptation iterations), which
            # would land on whichever version runs first
            for stage, (short, _) in windows.items():
                for version in trees:
                    timed(version, stage, short, work / f"warmup_{version}_{stage}")
            for rep in range(reps):
                for stage, (short, long) in windows.items():
                    for version in trees:
                        t_short = timed(version, stage, short, work / f"r{rep}_{version}_{stage}_short")
                        t_long = timed(version, stage, long, work / f"r{rep}_{version}_{stage}_long")
                        per_it = (t_long - t_short) / (long - short)
                        seconds[version][stage].append(per_it)
                        print(
                            f"[bench_iteration] rep {rep + 1}/{reps} {stage} {version}: {per_it:.3f} s/it "
                            f"({short} its {t_short:.1f} s, {long} its {t_long:.1f} s)",
                            file=sys.stderr,
                        )
        finally:
            shutil.rmtree(work, ignore_errors=True)

        result = {
            "command": " ".join(["python benchmarks/bench_iteration.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "torch": torch.__version__,
            "threads": threads,
            "reps": reps,
            "windows": windows,
            "device": device,
            "old": {"revision": old, "commit": old_commit, "data_workers": old_data_workers},
            "new": {"revision": new, "commit": new_commit, "amp": new_amp, "data_workers": new_data_workers},
            "seconds_per_iteration": seconds,
            "median": {},
            "speedup": {},
        }
        for stage in windows:
            old_med = statistics.median(seconds["old"][stage])
            new_med = statistics.median(seconds["new"][stage])
            result["median"][stage] = {"old": old_med, "new": new_med}
            result["speedup"][stage] = old_med / new_med
            result.setdefault("speedup_paired", {})[stage] = paired_speedup(seconds, stage)
        write_json_atomic(out / "bench_iteration.json", result)
        text = markdown(result)
        write_text_atomic(out / "bench_iteration.md", text)
        print(text)

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

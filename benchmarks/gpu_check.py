"""`make gpu-check`: a short run of every training stage on a GPU node before anyone spends GPU hours.

On a small embedded benchmark generated into a temporary folder (no download), with the default scenario's
detector: pretrain, memory extraction, coreset subsampling, VSPA adaptation (with one memory refresh), the
attention + local-global translator and evaluation, each for ``--iterations`` iterations on ``--device``.
Every training loss must stay finite (the check fails otherwise); for each stage it prints and writes the
seconds per iteration (or items per second) and the peak GPU memory (``torch.cuda.max_memory_allocated``).
``--amp`` runs the detector stages with mixed precision (``pretrain.amp`` / ``adapt.amp``).

Output: ``<out>/gpu_check.json`` and ``gpu_check.md``. On a machine without CUDA it stops with a message;
``--device cpu`` runs the same check on the CPU (what the test suite does, with 2 iterations).

    python benchmarks/gpu_check.py [--device cuda] [--iterations 30] [--amp]
"""

from __future__ import annotations

import csv
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vspa.utils import VspaError, run_stage, write_json_atomic, write_text_atomic  # noqa: E402


def _finite_log(path: Path, column: str) -> list[float]:
    with open(path) as f:
        values = [float(r[column]) for r in csv.DictReader(f)]
    bad = [i + 1 for i, v in enumerate(values) if not math.isfinite(v)]
    if not values or bad:
        raise VspaError(f"{path}: {column} is not finite at iteration(s) {bad[:5]} (or the log is empty).")
    return values


class Probe:
    """Wall time and peak accelerator memory of one block."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def __enter__(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            self.peak_mib = self.torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mib = None
        self.seconds = time.perf_counter() - self.start


def check(device_name: str, iterations: int, amp: bool, work: Path) -> dict:
    import torch

    from vspa.adaptation.trainer import AdaptConfig, AdaptData, adapt, input_fingerprint
    from vspa.config import compose
    from vspa.coreset.kcenter import subsample_memory
    from vspa.data.coco import DetectionDataset
    from vspa.data.synth import generate_benchmark
    from vspa.detection import checkpoint
    from vspa.detection.model import DetectorConfig, build_detector
    from vspa.detection.train import TrainConfig, train_detector
    from vspa.evaluation.runner import evaluate_model
    from vspa.memory.extract import extract_memory
    from vspa.memory.store import open_memory, write_memory
    from vspa.training.prefetch import default_workers
    from vspa.translation.trainer import TranslateConfig, train_translator

    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise VspaError(
            "gpu-check: no CUDA device is visible (torch.cuda.is_available() is False). Run it on a GPU "
            "node, or pass --device cpu to check the script itself on this machine."
        )
    device = torch.device(device_name)
    params = compose(ROOT / "conf")  # the default scenario, synth_fog (the configs have no code defaults for it)
    sizes = {"source_train": 24, "source_test": 8, "target_train": 24, "target_test": 16}
    data = work / "data"
    generate_benchmark(
        data, "synth_fog", sizes, seed=0, height=160, width=320, fog_beta=0.04, fog_airlight=0.8, progress=False
    )
    src_json = data / "source_train" / "annotations.json"
    src_ds = DetectionDataset(src_json)
    tgt_json = data / "target_train" / "annotations.json"
    model_cfg = DetectorConfig.from_params(params["model"])
    rows: list[dict] = []

    def record(stage: str, probe: Probe, per: str, count: int, **extra) -> None:
        row = {
            "stage": stage,
            "seconds": round(probe.seconds, 2),
            per: round(probe.seconds / count if per.startswith("sec") else count / probe.seconds, 4),
            "peak_mib": None if probe.peak_mib is None else round(probe.peak_mib, 1),
            **extra,
        }
        rows.append(row)
        print(f"[gpu-check] {stage}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "stage"), flush=True)

    torch.manual_seed(0)
    detector = build_detector(model_cfg, src_ds.num_classes)
    train_cfg = TrainConfig.from_params(
        {
            **params["pretrain"],
            "iterations": iterations,
            "warmup_iters": 2,
            "lr_steps": [],
            "device": device_name,
            "amp": amp,
        }
    )
    with Probe(torch, device) as probe:
        train_detector(src_ds, detector, train_cfg, work / "pretrain", work / "pretrain.csv", progress=False)
    record(
        "pretrain",
        probe,
        "sec_per_iter",
        iterations,
        final_loss=round(_finite_log(work / "pretrain.csv", "total")[-1], 4),
    )
    model_path = work / "source.pt"
    checkpoint.save(model_path, detector, model_cfg, src_ds.class_names)

    with Probe(torch, device) as probe:
        stats = extract_memory(detector, src_ds, work / "full.h5", device=device, progress=False)
    record("extract_memory", probe, "images_per_sec", len(src_ds), rows=stats.fg_rows + stats.bg_rows)
    with Probe(torch, device) as probe:
        subset, _ = subsample_memory(open_memory(work / "full.h5"), device=device)
        write_memory(work / "memory.h5", subset)
    record("subsample", probe, "sec_per_iter", 1)

    student, _ = checkpoint.load(model_path, device)
    adapt_cfg = AdaptConfig.from_params(
        {
            **params["adapt"],
            "iterations": iterations,
            "device": device_name,
            "refresh_every": max(1, iterations // 2),
            "checkpoint_every": iterations,
            "amp": amp,
        }
    )
    adapt_data = AdaptData(
        src_ds,
        DetectionDataset(tgt_json),
        work / "memory.h5",
        input_fingerprint(model_path, src_json, tgt_json, work / "memory.h5"),
    )
    with Probe(torch, device) as probe:
        teacher, _ = adapt(student, adapt_data, adapt_cfg, work / "adapt", work / "adapt.csv", progress=False)
    record(
        "adapt (VSPA)",
        probe,
        "sec_per_iter",
        iterations,
        final_loss=round(_finite_log(work / "adapt.csv", "total")[-1], 4),
    )
    checkpoint.save(work / "adapted.pt", teacher, model_cfg, src_ds.class_names)

    tcfg = TranslateConfig.from_params(
        {
            **params["translate"],
            "variant": "attention_lg",
            "iterations": iterations,
            "device": device_name,
            "checkpoint_every": iterations,
        }
    )
    with Probe(torch, device) as probe:
        result = train_translator(
            tcfg,
            data / "target_train",
            data / "source_train",
            work / "translator.pt",
            work / "translator_state.pt",
            work / "translator.csv",
            progress=False,
        )
    finals = {k: v for k, v in result.get("final_losses", {}).items() if isinstance(v, (int, float))}
    if not finals or not all(math.isfinite(float(v)) for v in finals.values()):
        raise VspaError(f"gpu-check: the translator's losses are not finite: {finals}")
    record("translate_train (attention + LG)", probe, "sec_per_iter", iterations)

    n_test = sizes["target_test"]
    with Probe(torch, device) as probe:
        metrics, _ = evaluate_model(work / "adapted.pt", data / "target_test", device, batch_size=8, progress=False)
    record("evaluate", probe, "images_per_sec", n_test, mAP=round(metrics["mAP"], 2))
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "iterations": iterations,
        "amp": amp,
        "data_threads": default_workers(device),
        "stages": rows,
    }


def markdown(report: dict) -> str:
    lines = [
        f"# GPU self-check: {report['device_name']} ({report['device']}), torch {report['torch']}, "
        f"{report['iterations']} iterations per training stage, amp {report['amp']}, "
        f"data threads {report.get('data_threads', 0)} (VSPA_DATA_WORKERS)",
        "",
        "| stage | seconds | per iteration / throughput | peak memory (MiB) | note |",
        "|---|---:|---:|---:|---|",
    ]
    for r in report["stages"]:
        rate = f"{r['sec_per_iter']:.3f} s/it" if "sec_per_iter" in r else f"{r['images_per_sec']:.1f} img/s"
        note = ", ".join(
            f"{k} {v}"
            for k, v in r.items()
            if k not in ("stage", "seconds", "sec_per_iter", "images_per_sec", "peak_mib")
        )
        lines.append(
            f"| {r['stage']} | {r['seconds']:.1f} | {rate} | "
            f"{'-' if r['peak_mib'] is None else r['peak_mib']} | {note} |"
        )
    return "\n".join(lines) + "\n"


def main(
    device: str = typer.Option("cuda", help="cuda, cuda:N, or cpu (to check the script itself)."),
    iterations: int = typer.Option(30, help="Iterations of each training stage."),
    amp: bool = typer.Option(False, help="Mixed precision for pretrain and adapt."),
    out: Path = typer.Option(Path("reports/bench/gpu_check"), help="Folder of gpu_check.{json,md}."),
) -> None:
    def body() -> None:
        if iterations < 2:
            raise VspaError("--iterations must be >= 2 (the adaptation refreshes its memory half-way).")
        with tempfile.TemporaryDirectory(prefix="vspa_gpu_check_") as tmp:
            report = check(device, iterations, amp, Path(tmp))
        write_json_atomic(out / "gpu_check.json", report)
        write_text_atomic(out / "gpu_check.md", markdown(report))
        print(markdown(report))

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

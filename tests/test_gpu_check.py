"""`make gpu-check` (benchmarks/gpu_check.py): the script runs every stage and checks finiteness; on a machine
without CUDA it stops with a message instead of a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path, **extra_env):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), **extra_env)
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )


def test_gpu_check_runs_every_stage_on_the_cpu_with_mixed_precision(tmp_path):
    # with the data threads of a GPU node (vspa.training.prefetch), which the CPU leaves off by default
    proc = run(["--device", "cpu", "--iterations", "2", "--amp"], tmp_path, VSPA_DATA_WORKERS="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["amp"] is True and report["iterations"] == 2 and report["data_threads"] == 2
    stages = [r["stage"] for r in report["stages"]]
    assert stages == [
        "pretrain",
        "extract_memory",
        "subsample",
        "adapt (VSPA)",
        "translate_train (attention + LG)",
        "evaluate",
    ]
    assert all(r["seconds"] > 0 for r in report["stages"])
    assert "| pretrain |" in (tmp_path / "gpu_check.md").read_text()
    assert "data threads 2" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_without_cuda_says_so(tmp_path):
    proc = run(["--device", "cuda", "--iterations", "2"], tmp_path)
    assert proc.returncode != 0
    assert "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()

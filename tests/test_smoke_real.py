"""`make smoke-real` as a slow test: every real-data preset through the real dvc.yaml at real image size (about
11-15 min per preset on one thread of the 2-core CPU; not part of `make test`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_real_preset_runs_end_to_end_at_real_size(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "smoke_real.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        cwd=ROOT,
        timeout=4 * 3600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "smoke_real.json").read_text())
    assert [r["scenario"] for r in results] == ["cityscapes_foggy", "sim10k_cityscapes", "voc_comic2k"]
    assert all(r["repro_seconds"] > 0 and all(n >= 2 for n in r["images"].values()) for r in results)

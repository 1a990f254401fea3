"""The seed aggregation of `make bench` on hand-made metrics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_rows", Path(__file__).parents[1] / "benchmarks" / "bench_rows.py")
bench_rows = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_rows)


def test_mean_and_sample_std_over_seeds():
    results = {
        0: {"vspa": {"mAP": 40.0, "AP": {"car": 50.0, "person": 30.0}}},
        1: {"vspa": {"mAP": 44.0, "AP": {"car": 54.0, "person": 34.0}}},
    }
    summary = bench_rows.summarise(results, ["vspa"])
    assert summary["vspa"]["mAP"]["mean"] == pytest.approx(42.0)
    assert summary["vspa"]["mAP"]["std"] == pytest.approx(2.8284271, rel=1e-6)  # sqrt(((-2)^2 + 2^2) / 1)
    assert summary["vspa"]["AP"]["car"]["values"] == [50.0, 54.0]
    table = bench_rows.render(summary, [0, 1])
    assert "| car | person | mAP |" in table
    assert "| 52.0 ± 2.8 | 32.0 ± 2.8 | 42.0 ± 2.8 |" in table


def test_gap_closed_from_the_mean_maps():
    results = {
        s: {"source_on_target": {"mAP": 20.0 + s, "AP": {"car": 20.0}},
            "vspa": {"mAP": 45.0 + s, "AP": {"car": 45.0}},
            "oracle_on_target": {"mAP": 70.0 + s, "AP": {"car": 70.0}}}
        for s in (0, 2)
    }
    summary = bench_rows.summarise(results, ["source_on_target", "vspa", "oracle_on_target"])
    assert bench_rows.gap_closed(summary) == {"vspa": pytest.approx(50.0)}  # (46 - 21) / (71 - 21)
    assert "50.0%" in bench_rows.render(summary, [0, 2])
    del summary["oracle_on_target"]
    assert bench_rows.gap_closed(summary) == {}

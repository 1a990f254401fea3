"""The diversity study's comparison: per-level paired differences and Welch's interval for their change."""

import math

import pytest

from vspa.reporting import diversity


def _summary(rows: dict[str, dict[int, float]]) -> dict:
    return {
        "rows": {
            r: {
                "mAP": {"values": {str(s): v for s, v in vals.items()}},
                "AP": {"car": {"values": {str(s): v + 1 for s, v in vals.items()}}},
            }
            for r, vals in rows.items()
        }
    }


def test_welch_matches_hand_computation():
    # a = 1,2,3 (var 1), b = 0,0,1 (var 1/3): se = sqrt(1/3 + 1/9) = 2/3, Welch df = 3.2 -> t(0.975, 3) = 3.1824
    out = diversity.welch([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
    assert out["mean"] == pytest.approx(5 / 3)
    assert out["df"] == pytest.approx(3.2)
    assert out["half_width"] == pytest.approx(3.18245 * 2 / 3, rel=1e-4)
    assert out["verdict"] == "not shown"
    assert diversity.welch([10.0, 11.0, 12.0], [0.0, 0.5, 1.0])["verdict"] == "shown"
    assert diversity.welch([1.0], [2.0, 3.0])["ci"] is None


def test_compare_levels_pairs_within_a_level_and_compares_across():
    standard = _summary({"at_like": {0: 50.0, 1: 52.0, 2: 48.0}, "vspa": {0: 51.0, 1: 53.0, 2: 49.5}})
    high = _summary({"at_like": {0: 40.0, 1: 45.0, 2: 41.0}, "vspa": {0: 44.0, 1: 48.0, 2: 45.5}})
    table = diversity.compare_levels({"standard": standard, "high": high}, ["at_like", "vspa"], [("vspa", "at_like")])
    pair = table["pairs"]["vspa - at_like"]
    assert pair["per_level"]["standard"]["diffs"] == pytest.approx([1.0, 1.0, 1.5])
    assert pair["per_level"]["high"]["diffs"] == pytest.approx([4.0, 3.0, 4.5])
    assert pair["per_level"]["high"]["verdict"] == "shown"  # 3.83 +- 4.30 * 0.76 / sqrt(3)
    assert pair["change"]["mean"] == pytest.approx(23 / 6 - 7 / 6)
    assert table["rows"]["vspa"]["high"]["mAP"]["mean"] == pytest.approx(137.5 / 3)
    assert table["rows"]["vspa"]["high"]["AP"]["car"] == pytest.approx(137.5 / 3 + 1)
    text = diversity.render(table, {"vspa": "VSPA"})
    assert "| VSPA | high | 3 |" in text and "vspa - at_like" in text
    # restricted to seeds 0-1, each level has two pairs
    two = diversity.compare_levels({"standard": standard, "high": high}, ["vspa"], [("vspa", "at_like")], seeds=[0, 1])
    assert two["pairs"]["vspa - at_like"]["per_level"]["high"]["n"] == 2
    assert not math.isnan(two["rows"]["vspa"]["standard"]["mAP"]["mean"])


def test_teacher_drift_counts_runs_below_the_precision_threshold():
    from vspa.reporting.seeds import render_drift, teacher_drift

    diags = {
        0: {
            "at_like": {"second_half": {"pseudo_precision": 0.88, "pseudo_per_image": 2.0}},
            "fair_source": {"second_half": {"pseudo_precision": None}},
        },
        2: {"at_like": {"second_half": {"pseudo_precision": 0.44, "pseudo_per_image": 3.9}}},
    }
    drift = teacher_drift(diags)
    assert drift == {"at_like": {"precision": {0: 0.88, 2: 0.44}, "per_image": {0: 2.0, 2: 3.9}, "drifted": [2]}}
    assert "| AT | 2 | 1/2 (seed 2) | 0.88, 0.44 | 2.0, 3.9 |" in render_drift(drift, {"at_like": "AT"})

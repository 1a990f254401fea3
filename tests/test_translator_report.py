"""The translator rows over seeds (vspa.reporting.translators) on hand-made metrics."""

import json

import pytest

from vspa.reporting.translators import collect, render_translators
from vspa.utils import VspaError


def _metrics(mAP):
    return {"mAP": mAP, "AP": {"car": mAP + 1, "truck": mAP - 1}}


def _write(tmp_path, maps):
    metrics, diag = tmp_path / "metrics", tmp_path / "translate"
    metrics.mkdir()
    (metrics / "source_on_target.json").write_text(json.dumps(_metrics(20.0)))
    for variant, per_seed in maps.items():
        for seed, value in enumerate(per_seed):
            (metrics / f"translate_{variant}_s{seed}.json").write_text(json.dumps(_metrics(value)))
            (diag / f"seed{seed}").mkdir(parents=True, exist_ok=True)
            (diag / f"seed{seed}" / f"{variant}_diagnostics.json").write_text(
                json.dumps(
                    {
                        "losses": {"loss_GA": {"first_10pct": 30.0 + seed, "last_10pct": 25.0}},
                        "final": {"mask_entropy": 1.5, "bg_on_objects": 0.1, "bg_off_objects": 0.2, "lg_gap": 0.05},
                    }
                )
            )
    return metrics, diag


def test_paired_differences_and_diagnostics_table(tmp_path):
    metrics, diag = _write(
        tmp_path, {"cut": [30.0, 32.0, 34.0], "attention": [31.0, 33.0, 35.5], "attention_lg": [29.0, 35.0, 30.0]}
    )
    results, diagnostics = collect(metrics, diag, [0, 1, 2])
    text, summary = render_translators(results, diagnostics)
    att_vs_cut = summary["paired"]["cut"]["attention"]
    assert att_vs_cut["diffs"] == [1.0, 1.0, 1.5]
    assert att_vs_cut["mean"] == pytest.approx(7 / 6)
    assert att_vs_cut["verdict"] == "shown"  # sd 0.29: the interval [0.45, 1.88] excludes 0
    assert summary["paired"]["attention"]["attention_lg"]["verdict"] == "not shown"
    assert summary["rows"]["cut"]["mAP"]["mean"] == pytest.approx(32.0)
    assert "| cut | 1 | 31.00 -> 25.00 |" in text and "| 1.500 | 0.100 / 0.200 | 0.050 |" in text
    assert "translator seeds" in text


def test_a_missing_run_names_the_file(tmp_path):
    metrics, diag = _write(tmp_path, {"cut": [30.0], "attention": [31.0], "attention_lg": [29.0]})
    with pytest.raises(VspaError, match="translate_cut_s1.json: missing"):
        collect(metrics, diag, [0, 1])

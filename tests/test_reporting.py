"""Comparison table: exact markdown on made-up metrics files, missing rows, gap closed, paper rows, the stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vspa.reporting import PAPER_RESULTS, ROW_DESCRIPTIONS, build_comparison, default_rows, render_markdown
from vspa.utils import VspaError

ROOT = Path(__file__).resolve().parents[1]


def write_metrics(folder: Path, name: str, ap: dict, m_ap: float | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"mAP": m_ap, "AP": ap, "num_images": 4}))


@pytest.fixture
def metrics_dir(tmp_path) -> Path:
    d = tmp_path / "metrics"
    write_metrics(d, "source_on_target", {"car": 30.0, "person": 20.0, "truck": 10.0}, 20.0)
    # vspa: mAP 30 -> gap closed (30 - 20) / (60 - 20) = 25 %; 24.96 prints as 25.0, 45.04 as 45.0
    write_metrics(d, "vspa", {"car": 45.04, "person": 24.96, "truck": 20.0}, 30.0)
    write_metrics(d, "oracle_on_target", {"car": 70.0, "person": 60.0, "truck": None}, 60.0)
    return d


def test_markdown_table_exact_lines_with_a_missing_row(metrics_dir):
    rows = default_rows(["source_on_target", "at_like", "vspa", "oracle_on_target"], metrics_dir)
    md = render_markdown(build_comparison(rows))
    assert md.splitlines() == [
        "| Method | car | person | truck | mAP | Gap closed |",
        "|---|---:|---:|---:|---:|---:|",
        "| Source only (no adaptation) | 30.0 | 20.0 | 10.0 | 20.0 | 0.0% |",
        "| Mean teacher + image-level adversarial (AT-like, no memory) | missing | missing | missing | missing | missing |",
        "| VSPA: mean teacher + memory fg/bg alignment (ours) | 45.0 | 25.0 | 20.0 | 30.0 | 25.0% |",
        "| Oracle (trained on target labels) | 70.0 | 60.0 | – | 60.0 | 100.0% |",
        "",
        "AP at IoU 0.5 (VOC all-point), percent. Gap closed = (mAP - source_on_target) / "
        "(oracle_on_target - source_on_target).",
        f"Missing: at_like ({metrics_dir / 'at_like.json'} not found; run its evaluate stage).",
    ]


def test_json_has_the_same_numbers(metrics_dir):
    comp = build_comparison(default_rows(["source_on_target", "at_like", "vspa", "oracle_on_target"], metrics_dir))
    assert comp["classes"] == ["car", "person", "truck"]
    by_name = {r["name"]: r for r in comp["rows"]}
    assert by_name["at_like"]["missing"] and "mAP" not in by_name["at_like"]
    assert by_name["vspa"]["gap_closed"] == pytest.approx(25.0)
    assert by_name["vspa"]["AP"]["car"] == 45.04
    assert by_name["vspa"]["description"] == ROW_DESCRIPTIONS["vspa"]


def test_gap_is_undefined_without_the_oracle(metrics_dir):
    (metrics_dir / "oracle_on_target.json").unlink()
    comp = build_comparison(default_rows(["source_on_target", "vspa", "oracle_on_target"], metrics_dir))
    assert [r.get("gap_closed") for r in comp["rows"]] == [None, None, None]
    assert "| VSPA: mean teacher + memory fg/bg alignment (ours) | 45.0 | 25.0 | 20.0 | 30.0 | – |" in render_markdown(
        comp
    )


def test_all_rows_missing_is_not_a_crash(tmp_path):
    comp = build_comparison(default_rows(["source_on_target", "unknown_row"], tmp_path / "none"))
    lines = render_markdown(comp).splitlines()
    assert lines[:4] == [
        "| Method | mAP | Gap closed |",
        "|---|---:|---:|",
        "| Source only (no adaptation) | missing | missing |",
        "| unknown_row | missing | missing |",  # a name without a description shows as itself
    ]


def test_paper_rows_fill_shared_classes(metrics_dir):
    comp = build_comparison(default_rows(["source_on_target"], metrics_dir), paper="cityscapes_foggy")
    md = render_markdown(comp).splitlines()
    # the paper's own gaps: Ours (53.1 - 23.5) / (42.7 - 23.5) = 29.6 / 19.2 = 154.2 %, AT 25.5 / 19.2 = 132.8 %
    assert "| Paper: Ours | 65.4 | 47.4 | 38.0 | 53.1 | 154.2% |" in md
    assert "| Paper: AT | 63.6 | 45.0 | 33.9 | 49.0 | 132.8% |" in md
    comic = render_markdown(build_comparison(default_rows(["source_on_target"], metrics_dir), paper="voc_comic2k"))
    assert "| Paper: Ours | 48.7 | 64.1 | – | 44.5 | – |" in comic.splitlines()  # no oracle in that table
    with pytest.raises(VspaError, match="unknown paper scenario 'nope'"):
        build_comparison([], paper="nope")
    assert set(PAPER_RESULTS) == {"cityscapes_foggy", "sim10k_cityscapes", "voc_comic2k"}


def test_different_class_lists_are_refused(metrics_dir):
    write_metrics(metrics_dir, "vspa", {"car": 50.0}, 50.0)
    with pytest.raises(VspaError, match=r"vspa.json has classes \['car'\] but .*source_on_target.json has"):
        build_comparison(default_rows(["source_on_target", "vspa"], metrics_dir))


def test_corrupt_metrics_file_names_the_file(metrics_dir):
    (metrics_dir / "vspa.json").write_text("{not json")
    with pytest.raises(VspaError, match=r"vspa.json: not a readable metrics JSON"):
        build_comparison(default_rows(["vspa"], metrics_dir))


def test_report_stage_writes_both_files(metrics_dir, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("scenario: synth_fog\n")
    out, json_out = tmp_path / "reports" / "comparison.md", tmp_path / "reports" / "comparison.json"
    cmd = [
        sys.executable,
        str(ROOT / "stages" / "report.py"),
        "--params",
        str(params),
        "--rows",
        "source_on_target,at_like,vspa,oracle_on_target",
        "--out",
        str(out),
        "--json-out",
        str(json_out),
        "--metrics-dir",
        str(metrics_dir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 rows, 1 missing" in proc.stdout
    assert (
        "| VSPA: mean teacher + memory fg/bg alignment (ours) | 45.0 | 25.0 | 20.0 | 30.0 | 25.0% |" in out.read_text()
    )
    assert "paper" not in json.loads(json_out.read_text())  # synth_fog is not a scenario of the paper
    bad = subprocess.run(
        cmd[:-2] + ["--metrics-dir", str(metrics_dir), "--paper", "nope"], capture_output=True, text=True, cwd=tmp_path
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown paper scenario 'nope'")


def test_subsets_become_rows_with_their_own_gap(tmp_path):
    """evaluate.subsets (e.g. each fog level): one block of rows per subset, gap closed within the subset."""
    d = tmp_path / "m"
    for name, whole, sub in (("source_on_target", 20.0, 10.0), ("vspa", 30.0, 25.0), ("oracle_on_target", 60.0, 50.0)):
        d.mkdir(exist_ok=True)
        (d / f"{name}.json").write_text(
            json.dumps(
                {
                    "mAP": whole,
                    "AP": {"car": whole},
                    "num_images": 6,
                    "subsets": {"beta_0.02": {"mAP": sub, "AP": {"car": sub}, "num_images": 2}},
                }
            )
        )
    comp = build_comparison(default_rows(["source_on_target", "vspa", "oracle_on_target"], d))
    names = [e["name"] for e in comp["rows"]]
    assert names == [
        "source_on_target",
        "vspa",
        "oracle_on_target",
        "source_on_target@beta_0.02",
        "vspa@beta_0.02",
        "oracle_on_target@beta_0.02",
    ]
    by = {e["name"]: e for e in comp["rows"]}
    assert by["vspa"]["gap_closed"] == pytest.approx(25.0)  # (30 - 20) / (60 - 20)
    assert by["vspa@beta_0.02"]["gap_closed"] == pytest.approx(37.5)  # (25 - 10) / (50 - 10)
    text = render_markdown(comp)
    assert "[whole test split]" in text and f"{ROW_DESCRIPTIONS['vspa']} [beta_0.02] | 25.0 | 25.0 | 37.5% |" in text

"""Comparison table in the layout of the paper's tables: one row per method, one AP50 column per class,
mAP, and the fraction of the source-to-oracle gap each method closes.

``build_comparison`` reads the metrics JSON files (``vspa.evaluation`` layout) into one dict, which is
written as ``reports/comparison.json``; ``render_markdown`` turns that dict into the markdown table.
A row whose metrics file does not exist yet is kept and marked missing.
"""

from __future__ import annotations

import json
import re
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vspa.utils import VspaError, write_json_atomic, write_text_atomic

# The one place that says what each evaluated model is (keys = names of reports/metrics/<name>.json).
ROW_DESCRIPTIONS: dict[str, str] = {
    "source_on_source": "Source only, tested on the source domain",
    "source_on_target": "Source only (no adaptation)",
    "fair_source": "Source only + strong aug + EMA (fair baseline, no target image)",
    "at_like": "Mean teacher + image-level adversarial (AT-like, no memory)",
    "mila_like": "AT-like + memory foreground alignment only (MILA-like)",
    "bg_only": "AT-like + memory background alignment only",
    "vspa": "VSPA: mean teacher + memory fg/bg alignment (ours)",
    "oracle_on_target": "Oracle (trained on target labels)",
    "translate_cut": "Translator without attention (CUT-like) + frozen source detector",
    "translate_attention": "Attention translator, no local-global loss + frozen source detector",
    "translate_attention_lg": "Attention translator + local-global loss + frozen source detector",
}

# Numbers printed in the paper (AP50, percent), for the scenarios it reports. Keys are scenario names;
# a paper row fills only the columns whose class the benchmark shares.
PAPER_RESULTS: dict[str, dict[str, Any]] = {
    "cityscapes_foggy": {
        "title": "Cityscapes -> Foggy Cityscapes, paper Table 1",
        "rows": {
            "Source (F-RCNN)": {
                "bus": 20.1,
                "bicycle": 31.9,
                "car": 39.6,
                "motorcycle": 16.9,
                "person": 29.0,
                "rider": 37.2,
                "train": 5.2,
                "truck": 8.1,
                "mAP": 23.5,
            },
            "AT": {
                "bus": 60.0,
                "bicycle": 49.0,
                "car": 63.6,
                "motorcycle": 38.8,
                "person": 45.0,
                "rider": 53.9,
                "train": 45.1,
                "truck": 33.9,
                "mAP": 49.0,
            },
            "MILA": {
                "bus": 61.4,
                "bicycle": 51.5,
                "car": 64.8,
                "motorcycle": 39.7,
                "person": 45.6,
                "rider": 52.8,
                "train": 54.1,
                "truck": 34.7,
                "mAP": 50.6,
            },
            "Ours": {
                "bus": 64.8,
                "bicycle": 54.9,
                "car": 65.4,
                "motorcycle": 43.8,
                "person": 47.4,
                "rider": 57.0,
                "train": 53.7,
                "truck": 38.0,
                "mAP": 53.1,
            },
            "Oracle (F-RCNN)": {
                "bus": 50.3,
                "bicycle": 40.7,
                "car": 61.3,
                "motorcycle": 32.5,
                "person": 43.1,
                "rider": 49.8,
                "train": 35.1,
                "truck": 28.6,
                "mAP": 42.7,
            },
        },
        "source": "Source (F-RCNN)",
        "oracle": "Oracle (F-RCNN)",
    },
    "sim10k_cityscapes": {
        "title": "Sim10k -> Cityscapes, car AP, ResNet-101, paper Table 2",
        "rows": {
            "Source": {"car": 41.8, "mAP": 41.8},
            "MILA": {"car": 58.2, "mAP": 58.2},
            "Ours": {"car": 62.3, "mAP": 62.3},
            "Oracle": {"car": 70.4, "mAP": 70.4},
        },
        "source": "Source",
        "oracle": "Oracle",
    },
    "voc_comic2k": {
        "title": "Pascal VOC -> Comic2k, paper Table 3",
        "rows": {
            "Source": {
                "bicycle": 32.5,
                "bird": 12.0,
                "car": 21.1,
                "cat": 10.4,
                "dog": 12.4,
                "person": 29.9,
                "mAP": 19.7,
            },
            "MILA": {"bicycle": 59.1, "bird": 28.5, "car": 49.8, "cat": 28.3, "dog": 35.7, "person": 66.3, "mAP": 44.6},
            "Ours": {"bicycle": 63.4, "bird": 24.6, "car": 48.7, "cat": 27.9, "dog": 38.3, "person": 64.1, "mAP": 44.5},
        },
        "source": "Source",
        "oracle": None,
    },
}


@dataclass
class Row:
    """One method of the table: its name, its metrics JSON and what it is."""

    name: str
    metrics_path: Path
    description: str


def default_rows(names: Sequence[str], metrics_dir: str | os.PathLike = "reports/metrics") -> list[Row]:
    """Rows for the given names: ``<metrics_dir>/<name>.json``, description from ``ROW_DESCRIPTIONS``
    (the name itself when it has none)."""
    return [Row(n, Path(metrics_dir) / f"{n}.json", describe(n)) for n in names]


def describe(name: str) -> str:
    """The row's description; ``<row>_s<N>`` (one seed of a row run over seeds) is ``<description> (seed N)``."""
    if name in ROW_DESCRIPTIONS:
        return ROW_DESCRIPTIONS[name]
    match = re.fullmatch(r"(.+)_s(\d+)", name)
    if match and match[1] in ROW_DESCRIPTIONS:
        return f"{ROW_DESCRIPTIONS[match[1]]} (seed {match[2]})"
    return name


def _read_metrics(path: Path) -> dict:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VspaError(
            f"{path}: not a readable metrics JSON ({exc}). Rerun the evaluate stage that writes it."
        ) from exc
    if not isinstance(metrics, dict) or not isinstance(metrics.get("AP"), dict) or "mAP" not in metrics:
        raise VspaError(f"{path}: expected keys 'mAP' and 'AP' (per class). Rerun the evaluate stage that writes it.")
    return metrics


def _gap_closed(value: float | None, source: float | None, oracle: float | None) -> float | None:
    """(value - source) / (oracle - source) in percent; None when undefined."""
    if value is None or source is None or oracle is None or oracle == source:
        return None
    return 100.0 * (value - source) / (oracle - source)


def build_comparison(
    rows: Sequence[Row],
    source: str = "source_on_target",
    oracle: str = "oracle_on_target",
    paper: str | None = None,
) -> dict[str, Any]:
    """The comparison as a JSON-ready dict: classes, one entry per row (missing rows flagged), and the
    paper's rows for scenario ``paper`` when given. ``source``/``oracle`` name the rows that define the
    gap; the gap is undefined (None) while either is missing.

    Raises VspaError when two metrics files list different classes (they come from different datasets).
    """
    if paper is not None and paper not in PAPER_RESULTS:
        raise VspaError(f"unknown paper scenario '{paper}'; choose one of {sorted(PAPER_RESULTS)} or leave it out.")
    classes: list[str] | None = None
    first_path: Path | None = None
    entries = []
    subsets: dict[str, list[dict]] = {}
    for row in rows:
        entry: dict[str, Any] = {
            "name": row.name,
            "description": row.description,
            "metrics_file": str(row.metrics_path),
        }
        if not row.metrics_path.is_file():
            entries.append({**entry, "missing": True})
            continue
        metrics = _read_metrics(row.metrics_path)
        row_classes = list(metrics["AP"])
        if classes is None:
            classes, first_path = row_classes, row.metrics_path
        elif row_classes != classes:
            raise VspaError(
                f"{row.metrics_path} has classes {row_classes} but {first_path} has {classes}; a table compares "
                "models on one test split. Re-evaluate both on the same data."
            )
        entries.append(
            {
                **entry,
                "missing": False,
                "AP": metrics["AP"],
                "mAP": metrics["mAP"],
                "coco_mAP50": metrics.get("coco_mAP50"),
            }
        )
        for sub, sm in (metrics.get("subsets") or {}).items():  # evaluate.subsets, e.g. each fog level
            subsets.setdefault(sub, []).append(
                {
                    "name": f"{row.name}@{sub}",
                    "description": f"{row.description} [{sub}]",
                    "metrics_file": str(row.metrics_path),
                    "missing": False,
                    "subset": sub,
                    "AP": sm["AP"],
                    "mAP": sm["mAP"],
                    "coco_mAP50": sm.get("coco_mAP50"),
                }
            )
    if subsets:  # the whole split's rows first, then one block per subset
        for e in entries:
            e["description"] += " [whole test split]"
        for block in subsets.values():
            entries += block

    by_name = {e["name"]: e for e in entries if not e["missing"]}
    for e in entries:
        if not e["missing"]:
            tag = f"@{e['subset']}" if e.get("subset") else ""
            src = by_name.get(source + tag, {}).get("mAP")
            orc = by_name.get(oracle + tag, {}).get("mAP")
            e["gap_closed"] = _gap_closed(e["mAP"], src, orc)

    out: dict[str, Any] = {"classes": classes or [], "source_row": source, "oracle_row": oracle, "rows": entries}
    if paper is not None:
        ref = PAPER_RESULTS[paper]
        p_src = ref["rows"].get(ref["source"], {}).get("mAP") if ref["source"] else None
        p_orc = ref["rows"].get(ref["oracle"], {}).get("mAP") if ref["oracle"] else None
        out["paper"] = {
            "scenario": paper,
            "title": ref["title"],
            "rows": [
                {
                    "name": name,
                    "AP": {c: v for c, v in values.items() if c != "mAP"},
                    "mAP": values["mAP"],
                    "gap_closed": _gap_closed(values["mAP"], p_src, p_orc),
                }
                for name, values in ref["rows"].items()
            ],
        }
        if not out["classes"]:  # no measured row yet: show the paper's columns
            out["classes"] = [c for c in next(iter(ref["rows"].values())) if c != "mAP"]
    return out


def _fmt(value: float | None, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.1f}{suffix}"


def render_markdown(comparison: dict[str, Any]) -> str:
    """The comparison as a markdown table (AP50 per class, mAP, gap closed, and the COCO-style mAP50 when the
    metrics files have it), one decimal like the paper."""
    classes = comparison["classes"]
    coco = any(e.get("coco_mAP50") is not None for e in comparison["rows"] if not e["missing"])
    header = ["Method", *classes, "mAP", "Gap closed"] + (["COCO-style mAP50"] if coco else [])
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    missing = []
    for e in comparison["rows"]:
        if e["missing"]:
            cells = ["missing"] * (len(classes) + 2 + coco)
            missing.append(e)
        else:
            cells = [_fmt(e["AP"].get(c)) for c in classes] + [_fmt(e["mAP"]), _fmt(e["gap_closed"], "%")]
            cells += [_fmt(e.get("coco_mAP50"))] if coco else []
        lines.append("| " + " | ".join([e["description"], *cells]) + " |")
    paper = comparison.get("paper")
    if paper:
        for e in paper["rows"]:
            cells = [_fmt(e["AP"].get(c)) for c in classes] + [_fmt(e["mAP"]), _fmt(e["gap_closed"], "%")]
            cells += ["–"] if coco else []
            lines.append("| " + " | ".join([f"Paper: {e['name']}", *cells]) + " |")
    notes = [
        "",
        f"AP at IoU 0.5 (VOC all-point), percent. Gap closed = (mAP - {comparison['source_row']}) / "
        f"({comparison['oracle_row']} - {comparison['source_row']}).",
    ]
    if coco:
        notes.append(
            "COCO-style mAP50: pycocotools, 101-point interpolation, 100 detections per image (detectron2's "
            "evaluator), the metric of Adaptive Teacher / CMT / ALDI; the paper's tables use VOC AP50."
        )
    subs = sorted({e["subset"] for e in comparison["rows"] if e.get("subset")})
    if subs:
        notes.append(
            f"Rows marked [{'], ['.join(subs)}]: the same detections scored on the test images of that "
            "evaluate.subsets entry only (gap closed against the source and oracle rows of the same subset); "
            "[whole test split]: every test image. Foggy Cityscapes: the paper, Adaptive Teacher and MILA report "
            "beta 0.02; some other work reports all three fog levels together."
        )
    if paper:
        notes.append(
            f"Paper rows: {paper['title']} (printed numbers; '–' where the paper has no such class or no oracle)."
        )
    for e in missing:
        notes.append(f"Missing: {e['name']} ({e['metrics_file']} not found; run its evaluate stage).")
    return "\n".join(lines + notes) + "\n"


def write_comparison(
    rows: Sequence[Row],
    md_path: str | os.PathLike,
    json_path: str | os.PathLike,
    source: str = "source_on_target",
    oracle: str = "oracle_on_target",
    paper: str | None = None,
) -> dict[str, Any]:
    """Build the comparison, write the markdown table and the JSON atomically, return the dict."""
    comparison = build_comparison(rows, source=source, oracle=oracle, paper=paper)
    markdown = render_markdown(comparison)
    write_json_atomic(json_path, comparison)
    write_text_atomic(md_path, markdown)
    return comparison

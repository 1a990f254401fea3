"""The visual-similarity experiment's table and bar plot (paper Fig. 1(b)): the `augsim_report` stage's logic.

Reads ``<metrics_dir>/augsim_<mode>_s<seed>.json`` (the evaluate stage's output for the adaptation run of
pairing mode ``<mode>`` with seed ``<seed>``) and writes ``<out_dir>/table.md`` (mode, mean mAP, sample
standard deviation over seeds, number of seeds, the paper's number), ``<out_dir>/results.json`` (the
same numbers, for `dvc metrics`) and ``<out_dir>/bar.png`` (one bar per mode with the standard deviation
as error bar). A mode without any metrics file is listed as missing. The source-only detector on the same
target split (``<metrics_dir>/<baseline>.json``, optional) is added as a reference row and a dashed line.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from vspa.adaptation.pairing import PAIRING_MODES
from vspa.utils import VspaError, atomic_path, write_json_atomic, write_text_atomic

LABELS = {
    "exact": "Domain only (fog)",
    "color": "Colour difference",
    "flip": "Orientation (flip)",
    "color_flip": "Colour + orientation",
}
PAPER_MAP = {"exact": 80.9, "color_flip": 76.7}
"""The two numbers the paper's text gives (Fig. 1(b), AugSim10k -> FoggyAugSim10k, MILA)."""
FILE_PATTERN = re.compile(r"^augsim_(?P<mode>[a-z_]+?)_s(?P<seed>\d+)\.json$")


def read_map(path: Path) -> float:
    """The ``mAP`` of a metrics file; raises ``VspaError`` naming the file when it has no numeric one."""
    try:
        value = json.loads(path.read_text()).get("mAP")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise VspaError(f"{path}: not a metrics JSON object ({exc}). Rerun its evaluate stage.") from exc
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise VspaError(f"{path}: 'mAP' is {value!r}, not a number. Rerun its evaluate stage.")
    return float(value)


def collect(metrics_dir: Path) -> dict[str, dict[int, float]]:
    """mode -> {seed: mAP} from the metrics files."""
    runs: dict[str, dict[int, float]] = {mode: {} for mode in PAIRING_MODES}
    for path in sorted(metrics_dir.glob("augsim_*_s*.json")):
        match = FILE_PATTERN.match(path.name)
        if match and match["mode"] in runs:
            runs[match["mode"]][int(match["seed"])] = read_map(path)
    return runs


def summarize(runs: dict[str, dict[int, float]]) -> list[dict]:
    """One row per mode: mean, sample standard deviation (0 with one seed), seeds, paper number."""
    rows = []
    for mode in PAIRING_MODES:
        values = [runs[mode][s] for s in sorted(runs[mode])]
        n = len(values)
        mean = sum(values) / n if n else None
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else (0.0 if n else None)
        rows.append(
            {
                "mode": mode,
                "label": LABELS[mode],
                "mean": mean,
                "std": std,
                "n": n,
                "seeds": sorted(runs[mode]),
                "values": values,
                "paper": PAPER_MAP.get(mode),
            }
        )
    return rows


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def markdown(rows: list[dict], baseline: float | None = None) -> str:
    lines = [
        "# AugSim -> FoggyAugSim: alignment pairs that differ in controlled attributes",
        "",
        "mAP@0.5 (%) on FoggyAugSim target_test; mean and sample standard deviation over seeds.",
        "",
        "| mode | pairs differ in | mean mAP | std | n seeds | paper |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r["mode"], r["label"], _fmt(r["mean"]), _fmt(r["std"]), str(r["n"]), _fmt(r["paper"])]
        lines.append("| " + " | ".join(cells) + " |")
    if baseline is not None:
        lines.append(f"| source only | no adaptation | {baseline:.1f} | — | — | — |")
    by_mode = {r["mode"]: r for r in rows}
    exact, both = by_mode["exact"]["mean"], by_mode["color_flip"]["mean"]
    lines.append("")
    if exact is not None and both is not None:
        paper_gap = PAPER_MAP["exact"] - PAPER_MAP["color_flip"]
        lines.append(f"exact - color_flip = {exact - both:+.1f} points (paper: {paper_gap:+.1f}).")
    missing = [r["mode"] for r in rows if r["n"] == 0]
    if missing:
        lines.append(f"Missing (no metrics file): {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


def bar_plot(rows: list[dict], path: Path, baseline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [r for r in rows if r["n"]]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = range(len(present))
    bars = ax.bar(
        xs,
        [r["mean"] for r in present],
        yerr=[r["std"] for r in present],
        capsize=6,
        color=["#2b6cb0", "#dd6b20", "#38a169", "#805ad5"][: len(present)],
    )
    for bar, r in zip(bars, present):
        ax.annotate(
            f"{r['mean']:.1f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height() + r["std"]),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            fontsize=9,
        )
    ax.set_xticks(list(xs), [f"{r['label']}\n(n={r['n']})" for r in present], fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label=f"source only ({baseline:.1f})")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_ylabel("mAP@0.5 (%)")
    ax.set_title("Alignment pair attributes vs. target mAP (cf. paper Fig. 1(b))", fontsize=10)
    if present:
        low = min([r["mean"] - r["std"] for r in present] + ([baseline] if baseline is not None else []))
        high = max(r["mean"] + r["std"] for r in present)
        pad = max(2.0, 0.15 * (high - low))
        ax.set_ylim(max(0.0, low - pad), min(100.0, high + 2 * pad))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write(metrics_dir: Path, out_dir: Path, baseline: str | None = "augsim_source_only") -> dict:
    """table.md, results.json and bar.png in ``out_dir`` from the metrics in ``metrics_dir``; returns the results.

    Raises VspaError naming ``metrics_dir`` when it holds no run's metrics."""
    rows = summarize(collect(metrics_dir))
    baseline_path = metrics_dir / f"{baseline}.json"
    reference = read_map(baseline_path) if baseline and baseline_path.is_file() else None
    if not any(r["n"] for r in rows):
        raise VspaError(
            f"{metrics_dir}: no augsim_<mode>_s<seed>.json metrics found. Run the augsim adaptation and "
            "evaluation stages first (`dvc repro evaluate_augsim`)."
        )
    write_text_atomic(out_dir / "table.md", markdown(rows, reference))
    results = {r["mode"]: {k: r[k] for k in ("mean", "std", "n", "seeds")} for r in rows}
    results = {**results, "source_only": reference}
    write_json_atomic(out_dir / "results.json", results)
    bar_plot(rows, out_dir / "bar.png", reference)
    return results

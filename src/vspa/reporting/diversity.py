"""The appearance-diversity study: the same rows at two levels of within-class diversity, side by side.

Input: one ``summarise``-shaped summary per level (``{"rows": {row: {"mAP": stats, "AP": {class: stats}}}}``,
stats with ``values`` per seed). Output: per level and row the mean ± std mAP and the AP of each class, the
paired differences of each comparison (e.g. VSPA - AT-like) at each level with their 95% intervals, and the
change of that difference from one level to the other. The levels are different datasets, so a seed of one
level is not paired with the same seed of the other: the change of a difference is tested with Welch's t
interval over the two levels' per-seed differences, not a paired one.
"""

from __future__ import annotations

import math
import statistics

from vspa.reporting.seeds import CONFIDENCE, paired, t_quantile


def _values(summary: dict, row: str, cls: str | None = None) -> dict[int, float]:
    stats = summary["rows"].get(row)
    if stats is None:
        return {}
    stats = stats["mAP"] if cls is None else stats["AP"].get(cls)
    return {int(s): float(v) for s, v in (stats or {}).get("values", {}).items()}


def welch(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean of ``a`` - mean of ``b`` with Welch's t interval (Welch-Satterthwaite degrees of freedom)."""
    out = {
        "mean": statistics.fmean(a) - statistics.fmean(b) if a and b else None,
        "ci": None,
        "half_width": None,
        "verdict": "not shown",
    }
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return out
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(0.5 + confidence / 2, max(1, int(df))) * se  # df rounded down: the wider interval
    lo, hi = out["mean"] - half, out["mean"] + half
    out.update(ci=[lo, hi], half_width=half, df=df, verdict="shown" if lo > 0 or hi < 0 else "not shown")
    return out


def compare_levels(
    levels: dict[str, dict], rows: list[str], pairs: list[tuple[str, str]], seeds: list[int] | None = None
) -> dict:
    """``levels[name]`` = a summary; ``pairs`` = (row, reference) differences to compare across levels.

    ``seeds``: restrict every level to these seeds (default: each level's own). Returns the table's data."""
    names = list(levels)
    out: dict = {"levels": names, "rows": {}, "pairs": {}}
    for level, summary in levels.items():
        for row in rows:
            vals = _values(summary, row)
            if seeds is not None:
                vals = {s: v for s, v in vals.items() if s in seeds}
            if not vals:
                continue
            classes = list(summary["rows"][row]["AP"])
            out["rows"].setdefault(row, {})[level] = {
                "mAP": {
                    "mean": statistics.fmean(vals.values()),
                    "n": len(vals),
                    "values": vals,
                    "std": statistics.stdev(vals.values()) if len(vals) > 1 else 0.0,
                },
                "AP": {
                    c: statistics.fmean(v for s, v in _values(summary, row, c).items() if s in vals) for c in classes
                },
            }
    for row, ref in pairs:
        key = f"{row} - {ref}"
        per_level = {}
        for level, summary in levels.items():
            a, b = _values(summary, row), _values(summary, ref)
            if seeds is not None:
                a = {s: v for s, v in a.items() if s in seeds}
            per_level[level] = paired(a, b)
        entry = {"per_level": per_level}
        if len(names) == 2:
            first, second = (per_level[n]["diffs"] for n in names)
            entry["change"] = welch(second, first)  # second level's difference - first level's
        out["pairs"][key] = entry
    return out


def render(table: dict, descriptions: dict[str, str]) -> str:
    names = table["levels"]
    classes = sorted({c for by_level in table["rows"].values() for s in by_level.values() for c in s["AP"]})
    lines = [
        "| Method | diversity | seeds | " + " | ".join(classes) + " | mAP (mean ± std) | mAP per seed |",
        "|---|---|---:|" + "---:|" * len(classes) + "---:|---|",
    ]
    for row, by_level in table["rows"].items():
        for level in names:
            s = by_level.get(level)
            if s is None:
                continue
            lines.append(
                f"| {descriptions.get(row, row)} | {level} | {s['mAP']['n']} | "
                + " | ".join(f"{s['AP'].get(c, float('nan')):.1f}" for c in classes)
                + f" | {s['mAP']['mean']:.1f} ± {s['mAP']['std']:.1f} | "
                + ", ".join(f"{v:.1f}" for v in s["mAP"]["values"].values())
                + " |"
            )
    head = " | ".join(f"{n}: mean [95% interval], verdict" for n in names)
    lines += [
        "",
        "Paired mAP differences at each level (Student t over the seeds), and the change of the "
        f"difference from {names[0]} to {names[-1]} (Welch t: the levels are different datasets):",
        "",
        f"| difference | {head} | change [95% interval], verdict |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    for key, entry in table["pairs"].items():
        cells = []
        for level in names:
            d = entry["per_level"][level]
            cells.append(
                "-"
                if d["mean"] is None
                else f"{d['mean']:+.2f}"
                + (
                    f" [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}], {d['verdict']}"
                    if d["ci"]
                    else f" (n={d['n']}), not shown"
                )
            )
        ch = entry.get("change") or {}
        change = (
            "-"
            if ch.get("mean") is None
            else f"{ch['mean']:+.2f}"
            + (f" [{ch['ci'][0]:+.2f}, {ch['ci'][1]:+.2f}], {ch['verdict']}" if ch.get("ci") else ", not shown")
        )
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {change} |")
    return "\n".join(lines) + "\n"

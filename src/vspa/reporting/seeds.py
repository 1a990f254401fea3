"""Tables over training seeds: per-row mean and spread, and paired differences with confidence intervals.

A *seed* fixes the source detector and every adaptation run made from it (``make bench``), so two rows of one
seed form a pair. The difference of two methods is judged on the per-seed differences ``d_s = a_s - b_s``:
mean, sample standard deviation, and a two-sided 95% Student-t interval ``mean +- t(0.975, n-1) * sd / sqrt(n)``.
The verdict is "shown" when the interval excludes 0, "not shown" otherwise (and with fewer than two seeds).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

CONFIDENCE = 0.95


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t distribution with ``df`` degrees of freedom.

    The CDF is integrated numerically (Simpson's rule on the density, the substitution ``t = tan(u)`` keeps the
    heavy tails of small ``df`` finite) and inverted by bisection; accurate to ~1e-6, e.g. t(0.975, 9) = 2.2622.
    """
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def mass(x: float, steps: int = 2000) -> float:  # P(0 <= T <= x) for x >= 0, integrated over u = atan(t)
        top = math.atan(x)
        h = top / steps

        def f(u: float) -> float:
            t = math.tan(u)
            return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df)) / math.cos(u) ** 2

        total = f(0.0) + f(top) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
        return total * h / 3

    lo, hi = 0.0, 1.0
    while 0.5 + mass(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + mass(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> dict:
    """The paired difference ``a - b`` over the seeds both have: per-seed values, mean, sd, the t interval."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = {
        "seeds": seeds,
        "diffs": diffs,
        "n": len(diffs),
        "mean": statistics.fmean(diffs) if diffs else None,
        "sd": None,
        "half_width": None,
        "ci": None,
        "verdict": "not shown",
    }
    if len(diffs) >= 2:
        sd = statistics.stdev(diffs)
        half = t_quantile(0.5 + confidence / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
        lo, hi = out["mean"] - half, out["mean"] + half
        out.update(sd=sd, half_width=half, ci=[lo, hi], verdict="shown" if lo > 0 or hi < 0 else "not shown")
    return out


def seeds_needed(sd: float, half_width: float, confidence: float = CONFIDENCE, limit: int = 1000) -> int | None:
    """Smallest seed count whose t interval half-width is <= ``half_width`` at a paired sd of ``sd``."""
    for n in range(2, limit + 1):
        if t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return None


def row_stats(per_seed: dict[int, dict], key: str = "mAP") -> dict:
    """Mean, sample std (0 for one seed) and per-seed values of ``key`` of one row's metrics."""
    values = {s: m[key] for s, m in sorted(per_seed.items()) if m.get(key) is not None}
    vals = list(values.values())
    return {
        "n": len(vals),
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "values": values,
    }


def summarise(results: dict[int, dict[str, dict]], rows: list[str], references: list[str]) -> dict:
    """``results[seed][row]`` = metrics (``mAP``, ``AP`` per class) -> per-row statistics of mAP and each class's
    AP, and for every row the paired mAP difference against each reference row present."""
    summary: dict = {"rows": {}, "paired": {}}
    for row in rows:
        per_seed = {s: results[s][row] for s in sorted(results) if row in results[s]}
        if not per_seed:
            continue
        classes = list(next(iter(per_seed.values()))["AP"])
        summary["rows"][row] = {
            "mAP": row_stats(per_seed),
            "AP": {c: row_stats({s: {"v": m["AP"].get(c)} for s, m in per_seed.items()}, "v") for c in classes},
        }
    for ref in references:
        if ref not in summary["rows"]:
            continue
        ref_values = summary["rows"][ref]["mAP"]["values"]
        for row, stats in summary["rows"].items():
            if row != ref:
                summary["paired"].setdefault(ref, {})[row] = paired(stats["mAP"]["values"], ref_values)
    return summary


def gap_closed(summary: dict, low: str = "source_on_target", high: str = "oracle_on_target") -> dict[str, float]:
    """Percent of the source -> oracle gap closed by each other row, from the mean mAPs ({} without both ends)."""
    rows = summary["rows"]
    if low not in rows or high not in rows or rows[high]["mAP"]["mean"] <= rows[low]["mAP"]["mean"]:
        return {}
    lo, hi = rows[low]["mAP"]["mean"], rows[high]["mAP"]["mean"]
    return {r: 100.0 * (s["mAP"]["mean"] - lo) / (hi - lo) for r, s in rows.items() if r not in (low, high)}


def _pm(stats: dict) -> str:
    return "-" if stats["mean"] is None else f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def render(summary: dict, descriptions: dict[str, str], split: str = "target test") -> str:
    """The markdown of ``rows.md``: the table of rows (with seed counts and per-seed mAP), the paired
    differences with their 95% intervals and verdicts, and the gap closed."""
    rows = summary["rows"]
    classes = list(next(iter(rows.values()))["AP"]) if rows else []
    lines = [
        f"AP50 (VOC all-point) on the {split} split: mean ± sample std over training seeds; a seed fixes the",
        "source detector and every run made from it, so rows of one seed are paired.",
        "",
        "| Method | seeds | " + " | ".join(classes) + " | mAP | mAP per seed |",
        "|---|---:|" + "---:|" * (len(classes) + 1) + "---|",
    ]
    for row, s in rows.items():
        per_seed = ", ".join(f"{v:.1f}" for v in s["mAP"]["values"].values())
        lines.append(
            f"| {descriptions.get(row, row)} | {s['mAP']['n']} | "
            + " | ".join(_pm(s["AP"][c]) for c in classes)
            + f" | {_pm(s['mAP'])} | {per_seed} |"
        )
    for ref, table in summary["paired"].items():
        lines += [
            "",
            f"Paired mAP difference against **{descriptions.get(ref, ref)}** (per seed: row - reference; 95% "
            'interval: Student t over the seeds both rows have; "shown" when it excludes 0):',
            "",
            "| Method | seeds | mean difference | sd | 95% interval | half-width | verdict |",
            "|---|---:|---:|---:|---|---:|---|",
        ]
        for row, d in table.items():
            if d["n"] < 2:
                lines.append(
                    f"| {descriptions.get(row, row)} | {d['n']} | "
                    + ("-" if d["mean"] is None else f"{d['mean']:+.1f}")
                    + " | - | - | - | not shown |"
                )
                continue
            lines.append(
                f"| {descriptions.get(row, row)} | {d['n']} | {d['mean']:+.2f} | {d['sd']:.2f} | "
                f"[{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] | {d['half_width']:.2f} | {d['verdict']} |"
            )
    gap = gap_closed(summary)
    if gap:
        lines += [
            "",
            "Gap closed, (mean mAP - source) / (oracle - source): "
            + ", ".join(f"{descriptions.get(r, r).split(':')[0].split(' (')[0]} {g:.1f}%" for r, g in gap.items())
            + ".",
        ]
    return "\n".join(lines) + "\n"


def plot_differences(summary: dict, path: Path, descriptions: dict[str, str]) -> None:
    """One panel per reference row: each method's per-seed differences (dots), mean and 95% interval (bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = [r for r, t in summary["paired"].items() if t]
    if not refs:
        return
    fig, axes = plt.subplots(1, len(refs), figsize=(6 * len(refs), 3.8), squeeze=False)
    for ax, ref in zip(axes[0], refs):
        table = summary["paired"][ref]
        for y, (row, d) in enumerate(table.items()):
            ax.scatter(d["diffs"], [y] * len(d["diffs"]), s=14, alpha=0.6, color="tab:blue")
            if d["ci"] is not None:
                colour = "tab:green" if d["verdict"] == "shown" else "tab:gray"
                ax.errorbar(
                    [d["mean"]],
                    [y],
                    xerr=[[d["mean"] - d["ci"][0]], [d["ci"][1] - d["mean"]]],
                    fmt="D",
                    color=colour,
                    capsize=4,
                )
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(table)))
        ax.set_yticklabels([row for row in table], fontsize=8)
        ax.set_xlabel("mAP difference per seed (row - reference)")
        ax.set_title(f"against {ref}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


DRIFT_PRECISION = 0.6  # a teacher whose kept pseudo-labels are below this precision has drifted (README)


def teacher_drift(diagnostics: dict[int, dict[str, dict]], threshold: float = DRIFT_PRECISION) -> dict:
    """``diagnostics[seed][row]`` = an adaptation run's diagnostics.json -> per row: the second-half pseudo-label
    precision and count per image of each seed, and the seeds whose precision is below ``threshold``.

    A mean-teacher run either keeps precise pseudo-labels or drifts into confirming its own false positives;
    the paired mean difference hides how often each method does the latter, so the bench reports it apart."""
    out: dict = {}
    for seed in sorted(diagnostics):
        for row, diag in diagnostics[seed].items():
            half = (diag or {}).get("second_half") or {}
            precision, per_image = half.get("pseudo_precision"), half.get("pseudo_per_image")
            if precision is None:
                continue
            entry = out.setdefault(row, {"precision": {}, "per_image": {}, "drifted": []})
            entry["precision"][seed], entry["per_image"][seed] = precision, per_image
            if precision < threshold:
                entry["drifted"].append(seed)
    return out


def render_drift(drift: dict, descriptions: dict[str, str], threshold: float = DRIFT_PRECISION) -> str:
    if not drift:
        return ""
    lines = [
        "",
        f"Teacher drift: second-half precision of the teacher's kept pseudo-labels on target train (checked "
        f"against its labels, for this diagnostic only), per seed; a run below {threshold} has drifted:",
        "",
        "| Method | seeds | drifted | precision per seed | pseudo-labels per image per seed |",
        "|---|---:|---|---|---|",
    ]
    for row, d in drift.items():
        n = len(d["precision"])
        lines.append(
            f"| {descriptions.get(row, row)} | {n} | {len(d['drifted'])}/{n}"
            + (f" (seed {', '.join(map(str, d['drifted']))})" if d["drifted"] else "")
            + " | "
            + ", ".join(f"{v:.2f}" for v in d["precision"].values())
            + " | "
            + ", ".join("-" if v is None else f"{v:.1f}" for v in d["per_image"].values())
            + " |"
        )
    return "\n".join(lines) + "\n"

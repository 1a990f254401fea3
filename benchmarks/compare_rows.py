"""Two `make bench` runs compared seed by seed -> ``<out>/compare.{json,md}``.

Used to check that a change meant to alter only speed or rounding (e.g. ``amp: true``, bfloat16 autocast on the
CPU) leaves the comparison table where it was: for each row and each seed both runs have, the new mAP beside
the base mAP and their difference; beside it the base run's seed spread (sample std over all its seeds), which
is the yardstick of "within the seed spread"; and, over the common seeds, the mean difference and the teacher
drift (pseudo-label precision, second half of training) of both runs. Both inputs are ``rows.json`` files
written by ``benchmarks/bench_rows.py``.

    python benchmarks/compare_rows.py --base reports/bench/rows/rows.json \\
        --new reports/bench/rows_amp/rows.json --out reports/bench/rows_amp [--split test]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vspa.reporting.tables import ROW_DESCRIPTIONS  # noqa: E402
from vspa.utils import VspaError, run_stage, write_json_atomic, write_text_atomic  # noqa: E402


def _read(path: Path) -> dict:
    if not path.is_file():
        raise VspaError(f"{path}: not found. It is the rows.json of a `benchmarks/bench_rows.py` run.")
    data = json.loads(path.read_text())
    if "test" not in data or "rows" not in data["test"]:
        raise VspaError(f"{path}: not a bench_rows.py rows.json (no test.rows).")
    return data


def compare(base: dict, new: dict, split: str = "test") -> dict:
    """Per row present in both: the base spread and the per-seed pairs (see the module docstring)."""
    out = {}
    for row, new_row in new[split]["rows"].items():
        base_row = base[split]["rows"].get(row)
        if base_row is None:
            continue
        b_vals, n_vals = base_row["mAP"]["values"], new_row["mAP"]["values"]
        common = sorted(set(b_vals) & set(n_vals), key=int)
        if not common:
            continue
        diffs = [n_vals[s] - b_vals[s] for s in common]
        b_std = base_row["mAP"]["std"]
        drift = {}
        for name, data in (("base", base), ("new", new)):
            prec = data.get("teacher_drift", {}).get(row, {}).get("precision", {})
            drift[name] = {s: prec[s] for s in common if s in prec}
        out[row] = {
            "base_seeds": base_row["mAP"]["n"],
            "base_mean": base_row["mAP"]["mean"],
            "base_std": b_std,
            "seeds": common,
            "base": {s: b_vals[s] for s in common},
            "new": {s: n_vals[s] for s in common},
            "diff": dict(zip(common, diffs)),
            "mean_diff": statistics.fmean(diffs),
            "max_abs_diff_in_std": (max(abs(d) for d in diffs) / b_std) if b_std else None,
            "pseudo_precision": drift,
        }
    return out


def to_markdown(result: dict, base_path: Path, new_path: Path, split: str) -> str:
    lines = [
        f"Per-seed mAP (AP50, target {split}) of two bench runs: base `{base_path}`, new `{new_path}`. The base "
        "spread is its sample std over all its seeds; a difference is within the seed spread when it is smaller "
        "than that std.",
        "",
        "| Method | base seeds | base mean ± std | seed | base | new | new - base | in base std |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, r in result.items():
        for i, s in enumerate(r["seeds"]):
            head = (
                f"| {ROW_DESCRIPTIONS.get(row, row)} | {r['base_seeds']} | {r['base_mean']:.1f} ± {r['base_std']:.1f}"
                if i == 0
                else "| | |"
            )
            ratio = f"{abs(r['diff'][s]) / r['base_std']:.2f}" if r["base_std"] else "-"
            lines.append(f"{head} | {s} | {r['base'][s]:.1f} | {r['new'][s]:.1f} | {r['diff'][s]:+.1f} | {ratio} |")
    drift_rows = [(row, r) for row, r in result.items() if r["pseudo_precision"]["base"]]
    if drift_rows:
        seeds = sorted({s for _, r in drift_rows for s in r["seeds"]}, key=int)  # rows may have different seeds
        lines += [
            "",
            "Teacher pseudo-label precision (second half of training), base / new:",
            "",
            "| Method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|" + "---:|" * len(seeds),
        ]

        def cell(r: dict, s: str) -> str:
            base, new = r["pseudo_precision"]["base"].get(s), r["pseudo_precision"]["new"].get(s)
            return "-" if base is None or new is None else f"{base:.2f} / {new:.2f}"

        for row, r in drift_rows:
            lines.append(f"| {ROW_DESCRIPTIONS.get(row, row)} | " + " | ".join(cell(r, s) for s in seeds) + " |")
    return "\n".join(lines) + "\n"


def main(
    base: Path = typer.Option(Path("reports/bench/rows/rows.json"), help="rows.json of the reference run."),
    new: Path = typer.Option(..., help="rows.json of the run to compare."),
    out: Path = typer.Option(..., help="Folder of compare.{json,md}."),
    split: str = typer.Option("test", help="test or val."),
) -> None:
    def body() -> None:
        if split not in ("test", "val"):
            raise VspaError(f"--split must be test or val, got {split!r}.")
        base_data, new_data = _read(base), _read(new)
        result = compare(base_data, new_data, split)
        if not result:
            raise VspaError(f"{base} and {new} have no row with a seed in common.")
        write_json_atomic(out / "compare.json", {"base": str(base), "new": str(new), "split": split, "rows": result})
        md = to_markdown(result, base, new, split)
        write_text_atomic(out / "compare.md", md)
        print(md)

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

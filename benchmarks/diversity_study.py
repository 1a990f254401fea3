"""`make bench-diversity`: where should instance-level alignment matter? AT-like, MILA-like and VSPA at standard
and at high within-class appearance diversity (``prepare.diversity``), on the protocol of ``make bench``.

- standard: the rows of ``make bench`` (``--standard``, default ``reports/bench/rows/rows.json``; its extra
  seeds carry MILA-like);
- high: ``params.yaml`` with ``prepare.diversity: high`` (any hue, surface patterns, stretched proportions,
  trucks rare at 6%) rendered to ``--data`` by the prepare stage, then ``benchmarks/bench_rows.py`` over
  ``--seeds`` with the rows source only, AT-like, MILA-like and VSPA into ``--out``/high (resumable: finished
  runs are kept);
- the comparison: ``--out``/diversity.{json,md}: per level and row mean ± std mAP and per-class AP, the paired
  differences VSPA - AT-like, MILA-like - AT-like and VSPA - MILA-like at each level with 95% t intervals, and the
  change of each difference between the levels (Welch t interval).

    python benchmarks/diversity_study.py [--seeds 0-2] [--report-only]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vspa.reporting import diversity  # noqa: E402
from vspa.reporting.tables import ROW_DESCRIPTIONS  # noqa: E402
from vspa.utils import VspaError, run_stage, write_json_atomic, write_text_atomic  # noqa: E402

ROWS = ["source_on_target", "at_like", "mila_like", "vspa"]
PAIRS = [("vspa", "at_like"), ("mila_like", "at_like"), ("vspa", "mila_like")]


def high_params(params: Path, dest: Path) -> Path:
    """``params`` with ``prepare.diversity: high`` (only that line changes, so the rest stays byte-equal)."""
    lines = params.read_text().splitlines(keepends=True)
    section, done = None, False
    for i, line in enumerate(lines):
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            section = line.strip()[:-1]
        elif section == "prepare" and line.strip().startswith("diversity:"):
            lines[i] = re.sub(r"(diversity:\s*)\S+", lambda m: m.group(1) + "high", line, count=1)
            done = True
    if not done:
        raise VspaError(f"{params}: no prepare.diversity line to set to high.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(lines)
    if yaml.safe_load(text)["prepare"]["diversity"] != "high":
        raise VspaError(f"{params}: could not set prepare.diversity (got {yaml.safe_load(text)['prepare']}).")
    if not dest.is_file() or dest.read_text() != text:
        dest.write_text(text)
    return dest


def main(
    seeds: str = typer.Option("0-2", help="Seeds of the high-diversity runs."),
    params: Path = typer.Option(Path("params.yaml"), help="Base params (standard diversity)."),
    standard: Path = typer.Option(Path("reports/bench/rows/rows.json"), help="make bench's rows.json (standard)."),
    out: Path = typer.Option(Path("reports/bench/diversity"), help="Folder of the study."),
    data: Path = typer.Option(Path("data/benchmark_high"), help="Where the high-diversity splits are rendered."),
    work: Path = typer.Option(Path("models/bench_div_high"), help="Models of the high-diversity runs."),
    jobs: int = typer.Option(2, help="Seed chains at a time."),
    threads: int = typer.Option(1, help="Threads per process."),
    report_only: bool = typer.Option(False, help="Only compose the table from finished runs."),
) -> None:
    def body() -> None:
        high_out = out / "high"
        if not report_only:
            p_high = high_params(params, out / "params_high.yaml")
            if not (data / "target_test" / "annotations.json").is_file():
                subprocess.run(
                    [
                        sys.executable,
                        "stages/prepare.py",
                        "--params",
                        str(p_high),
                        "--out",
                        str(data),
                        "--summary",
                        str(out / "data_summary_high.json"),
                    ],
                    cwd=ROOT,
                    check=True,
                )
            subprocess.run(
                [
                    sys.executable,
                    "benchmarks/bench_rows.py",
                    "--seeds",
                    seeds,
                    "--extra-seeds",
                    "",
                    "--rows",
                    ",".join(ROWS),
                    "--params",
                    str(p_high),
                    "--out",
                    str(high_out),
                    "--work",
                    str(work),
                    "--data",
                    str(data),
                    "--snapshot-every",
                    "0",
                    "--jobs",
                    str(jobs),
                    "--threads",
                    str(threads),
                ],
                cwd=ROOT,
                check=True,
            )
        levels, done = {}, None
        for level, path in (("standard", standard), ("high", high_out / "rows.json")):
            if not path.is_file():
                raise VspaError(f"{path}: missing; run `make bench` (standard) and this study without --report-only.")
            report = json.loads(path.read_text())
            levels[level] = report["test"]
            done = report["seeds_done"]  # the high level's finished seeds: both levels are read on those
        table = diversity.compare_levels(levels, ROWS, PAIRS, seeds=done)
        table["seeds"] = done
        write_json_atomic(out / "diversity.json", table)
        text = (
            "Within-class appearance diversity study (target test, AP50 VOC all-point), seeds "
            f"{', '.join(map(str, done))} at both levels. standard: `{standard}`; high: "
            f"`{high_out / 'rows.json'}` (`prepare.diversity: high`). Written by "
            "`python benchmarks/diversity_study.py`.\n\n" + diversity.render(table, ROW_DESCRIPTIONS)
        )
        write_text_atomic(out / "diversity.md", text)
        print(text)

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

"""Stage `augsim_report`: the visual-similarity experiment's table and bar plot (paper Fig. 1(b)).

Glue around :func:`vspa.reporting.augsim.write` (what it reads and writes is described there).
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.reporting.augsim import write
from vspa.utils import run_stage


def main(
    metrics_dir: Path = typer.Option(
        ..., help="Folder of augsim_<mode>_s<seed>.json; in dvc.yaml: reports/augsim/metrics."
    ),
    out_dir: Path = typer.Option(
        ..., help="Output folder: table.md, results.json, bar.png; in dvc.yaml: reports/augsim."
    ),
    baseline: str = typer.Option("augsim_source_only", help="Metrics name of the source-only reference (optional)."),
) -> None:
    def body() -> None:
        write(metrics_dir, out_dir, baseline)
        typer.echo(f"wrote {out_dir}/table.md, results.json, bar.png")

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

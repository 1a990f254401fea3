"""Stage report: the comparison table of the evaluated models (markdown + JSON).

Reads ``<metrics-dir>/<row>.json`` (in dvc.yaml: reports/metrics) for each row; a row without its file is listed
as missing. Writes ``--out`` (markdown) and ``--json-out``; every path is an option without default. Reads params:
scenario (to add the paper's numbers when the paper reports that scenario; see --paper).
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.config import stage_config
from vspa.reporting.tables import PAPER_RESULTS, default_rows, write_comparison
from vspa.utils import VspaError, run_stage


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    rows: str = typer.Option("source_on_target,at_like,vspa,oracle_on_target", help="Comma-separated row names."),
    out: Path = typer.Option(..., help="Markdown table, e.g. reports/comparison.md."),
    json_out: Path = typer.Option(..., help="Same numbers as JSON, e.g. reports/comparison.json."),
    metrics_dir: Path = typer.Option(..., help="Folder of the metrics JSON files; in dvc.yaml: reports/metrics."),
    source: str = typer.Option("source_on_target", help="Row that is 0% of the gap."),
    oracle: str = typer.Option("oracle_on_target", help="Row that is 100% of the gap."),
    paper: str = typer.Option(
        "auto", help=f"Paper numbers to add: auto (the scenario's, if any), none, or one of {sorted(PAPER_RESULTS)}."
    ),
) -> None:
    def body() -> None:
        names = [n.strip() for n in rows.split(",") if n.strip()]
        if not names:
            raise VspaError("--rows is empty: give comma-separated metrics names, e.g. source_on_target,vspa.")
        if paper == "auto":
            scenario = stage_config(params)["scenario"]
            paper_key = scenario if scenario in PAPER_RESULTS else None
        else:
            paper_key = None if paper == "none" else paper
        comparison = write_comparison(
            default_rows(names, metrics_dir), out, json_out, source=source, oracle=oracle, paper=paper_key
        )
        n_missing = sum(e["missing"] for e in comparison["rows"])
        typer.echo(f"wrote {out} and {json_out}: {len(names) - n_missing} rows, {n_missing} missing")

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

"""Stage `prepare`: build the benchmark's four splits in the on-disk format of docs/architecture.md.

Glue around :func:`vspa.data.prepare.prepare` (synthetic benchmark, real-data importers or COCO-format
splits; written atomically: see there).
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.data.prepare import prepare
from vspa.utils import run_stage


def main(
    params: str = typer.Option("params.yaml", help="Params file (reads `scenario`, `data.root`, `prepare:`)."),
    out: Path = typer.Option(..., help="Folder of the four splits (replaced as a whole); in dvc.yaml: data/benchmark."),
    summary: Path = typer.Option(..., help="Summary JSON: counts and seconds; in dvc.yaml: reports/data/summary.json."),
    workers: int = typer.Option(2, help="Processes that render the synthetic benchmark."),
) -> None:
    """Generate the embedded benchmark or import COCO-format splits into --out."""
    result = run_stage(prepare, params, out, summary, workers)
    counts = ", ".join(
        f"{s}: {v.get('images')} images / {v.get('objects')} objects" for s, v in result["splits"].items()
    )
    typer.echo(f"prepare ({result['source']}, {result['scenario']}): {counts}; {result['seconds']} s -> {out}")


if __name__ == "__main__":
    typer.run(main)

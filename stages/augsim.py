"""Stage `augsim`: AugSim, FoggyAugSim and the pairing-memory variant sets (paper 3.2).

From the benchmark's source splits (``--src``): AugSim under ``--augsim-out`` (with the pairing variant sets
in its ``pairing/``) and FoggyAugSim under ``--foggy-out``; glue around :mod:`vspa.data.augsim_sets` (what each
folder holds, params, atomic outputs: see there). A summary goes to
``--summary``, a picture of a few images in the four appearances (like the paper's Fig. 1(a)) to ``--examples``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.data.augsim_sets import build, examples_figure, read_config
from vspa.utils import run_stage, write_json_atomic


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    src: Path = typer.Option(..., help="Folder with source_train/ and source_test/; in dvc.yaml: data/benchmark."),
    augsim_out: Path = typer.Option(
        ..., help="Output: AugSim splits and pairing/ variant sets; in dvc.yaml: data/augsim."
    ),
    foggy_out: Path = typer.Option(..., help="Output: FoggyAugSim target splits; in dvc.yaml: data/foggy_augsim."),
    summary: Path = typer.Option(..., help="Output: counts per variant; in dvc.yaml: reports/augsim/summary.json."),
    examples: Path = typer.Option(
        ...,
        help="Output: original / colour / colour+flip / flip of a few images; in dvc.yaml: "
        "reports/augsim/examples.png.",
    ),
) -> None:
    def body() -> None:
        result = build(read_config(params), src, augsim_out, foggy_out)
        write_json_atomic(summary, result)
        examples_figure(src / "source_train", augsim_out / "pairing", examples)
        typer.echo(f"wrote {augsim_out} and {foggy_out} in {result['seconds']} s: {result['augsim']}")

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

"""Stage pretrain: supervised training of the detector on the labelled source split ("burn-in").

Writes models/source/model.pt (detector checkpoint), reports/pretrain/losses.csv (loss per iteration, for
`dvc plots`) and keeps its resumable state in models/source/work/last.pt. Reads params: model.*, pretrain.*.
Multi-process: torchrun --nproc_per_node=N stages/pretrain.py.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.detection.train import run_training_stage
from vspa.utils import run_stage


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    data: Path = typer.Option(Path("data/benchmark/source_train"), help="Labelled split folder (annotations.json)."),
    out: Path = typer.Option(Path("models/source/model.pt"), help="Output detector checkpoint."),
    log: Path = typer.Option(Path("reports/pretrain/losses.csv"), help="Output loss log (CSV)."),
    work_dir: Path = typer.Option(Path("models/source/work"), help="Resumable training state."),
) -> None:
    run_stage(run_training_stage, params, "pretrain", data, out, log, work_dir, "source-only training")


if __name__ == "__main__":
    typer.run(main)

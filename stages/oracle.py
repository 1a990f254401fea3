"""Stage oracle: supervised training on the target training split with its labels (the upper bound).

Writes ``--out`` (in dvc.yaml: models/oracle/model.pt), ``--log`` (reports/oracle/losses.csv) and keeps its
resumable state in ``<work-dir>/last.pt`` (models/oracle/work). Reads params: model.*, oracle.*. Every path is
an option without default: dvc.yaml passes them all.
Multi-process: torchrun --nproc_per_node=N stages/oracle.py --data ... (the options of the stage's cmd).
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.detection.train import run_training_stage
from vspa.utils import run_stage


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    data: Path = typer.Option(..., help="Labelled target split folder; in dvc.yaml: data/benchmark/target_train."),
    out: Path = typer.Option(..., help="Output detector checkpoint; in dvc.yaml: models/oracle/model.pt."),
    log: Path = typer.Option(..., help="Output loss log (CSV); in dvc.yaml: reports/oracle/losses.csv."),
    work_dir: Path = typer.Option(..., help="Resumable training state; in dvc.yaml: models/oracle/work."),
) -> None:
    run_stage(run_training_stage, params, "oracle", data, out, log, work_dir, "oracle training on labelled target data")


if __name__ == "__main__":
    typer.run(main)

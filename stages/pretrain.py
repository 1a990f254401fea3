"""Stage pretrain: supervised training of the detector on the labelled source split ("burn-in").

Writes ``--out`` (detector checkpoint; in dvc.yaml: models/source/model.pt), ``--log`` (loss per iteration, for
`dvc plots`; reports/pretrain/losses.csv) and keeps its resumable state in ``<work-dir>/last.pt``
(models/source/work). Reads params: model.*, pretrain.*. Every path is an option without default: dvc.yaml
passes them all. Multi-process: torchrun --nproc_per_node=N stages/pretrain.py --data ... --out ... (the same
options as the stage's cmd in dvc.yaml).
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.detection.train import run_training_stage
from vspa.utils import run_stage


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    data: Path = typer.Option(..., help="Labelled split folder (annotations.json); in dvc.yaml: "
                              "data/benchmark/source_train."),
    out: Path = typer.Option(..., help="Output detector checkpoint; in dvc.yaml: models/source/model.pt."),
    log: Path = typer.Option(..., help="Output loss log (CSV); in dvc.yaml: reports/pretrain/losses.csv."),
    work_dir: Path = typer.Option(..., help="Resumable training state; in dvc.yaml: models/source/work."),
) -> None:
    run_stage(run_training_stage, params, "pretrain", data, out, log, work_dir, "source-only training")


if __name__ == "__main__":
    typer.run(main)

"""Stage oracle: supervised training on the target training split with its labels (the upper bound).

Writes models/oracle/model.pt, reports/oracle/losses.csv and keeps its resumable state in
models/oracle/work/last.pt. Reads params: model.*, oracle.*.
Multi-process: torchrun --nproc_per_node=N stages/oracle.py.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.detection.train import run_training_stage
from vspa.utils import run_stage


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    data: Path = typer.Option(Path("data/benchmark/target_train"), help="Labelled target split folder."),
    out: Path = typer.Option(Path("models/oracle/model.pt"), help="Output detector checkpoint."),
    log: Path = typer.Option(Path("reports/oracle/losses.csv"), help="Output loss log (CSV)."),
    work_dir: Path = typer.Option(Path("models/oracle/work"), help="Resumable training state."),
) -> None:
    run_stage(run_training_stage, params, "oracle", data, out, log, work_dir, "oracle training on labelled target data")


if __name__ == "__main__":
    typer.run(main)

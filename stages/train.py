"""Stage pretrain / oracle: supervised training of the detector on one labelled split.

``--section pretrain`` trains the source detector on the labelled source split ("burn-in"; in dvc.yaml stage
pretrain: models/source/model.pt, reports/pretrain/losses.csv, state in models/source/work); ``--section oracle``
trains the upper bound on the target training split with its labels (stage oracle: models/oracle/...). The
section names the params block the run reads (model.* and <section>.*). Writes ``--out`` (detector
checkpoint), ``--log-csv`` (loss per iteration, for `dvc plots`) and keeps its resumable state in
``<work-dir>/last.pt``. Every path is an option without default: dvc.yaml passes them all.
Multi-process: torchrun --nproc_per_node=N stages/train.py --section ... --data ... (the options of the stage's cmd;
torchrun's parser reads them too and refuses an abbreviation of its own options, such as ``--log``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.detection.train import run_training_stage
from vspa.utils import VspaError, run_stage

WHAT = {"pretrain": "source-only training", "oracle": "oracle training on labelled target data"}


def main(
    section: str = typer.Option(..., help="Params section of the run: pretrain (source detector) or oracle."),
    params: str = typer.Option("params.yaml", help="Params file."),
    data: Path = typer.Option(
        ...,
        help="Labelled split folder (annotations.json); in dvc.yaml: "
        "data/benchmark/source_train (pretrain), data/benchmark/target_train (oracle).",
    ),
    out: Path = typer.Option(..., help="Output detector checkpoint; in dvc.yaml: models/<source|oracle>/model.pt."),
    log: Path = typer.Option(
        ..., "--log-csv", help="Output loss log (CSV); in dvc.yaml: reports/<section>/losses.csv."
    ),
    work_dir: Path = typer.Option(..., help="Resumable training state; in dvc.yaml: models/<source|oracle>/work."),
) -> None:
    def body() -> None:
        if section not in WHAT:
            raise VspaError(f"--section '{section}': choose one of {', '.join(WHAT)}.")
        run_training_stage(params, section, data, out, log, work_dir, WHAT[section])

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

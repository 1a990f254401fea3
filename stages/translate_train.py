"""Stage translate_train: train the target -> source translator of one variant (cut | attention | attention_lg).

Reads params section ``translate`` (see ``vspa.translation.config.TranslateConfig``); ``--variant``
overrides ``translate.variant`` and ``--seed`` ``translate.seed`` (dvc.yaml runs a matrix of the three variants
and seeds 0-2, each seed in its own folders; the variants of one seed see identical inputs). Writes
``<out-dir>/<variant>/model.pt`` (the translator), ``<out-dir>/<variant>/train_state.pt`` (the resumable
training state, persistent), ``<reports-dir>/<variant>_losses.csv`` (dvc plots),
``<reports-dir>/<variant>_grid.png`` (input | translated | content maps, and the masks, of four target images)
and ``<reports-dir>/<variant>_diagnostics.json`` (dvc metrics: mask entropy, background mask on and off the
objects, L_GA's view separation, at initialisation and at the end; the losses over the first and last 10 %
of the run; see ``vspa.translation.diagnostics``). Every path is an option without default (in dvc.yaml:
``--out-dir models/translator/seed<S> --reports-dir reports/translate/seed<S>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vspa.config import stage_config
from vspa.translation.config import TranslateConfig
from vspa.translation.trainer import train_translator
from vspa.utils import run_stage


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    variant: Optional[str] = typer.Option(
        None, help="cut | attention | attention_lg (default: translate.variant if set, else attention_lg)."
    ),
    seed: Optional[int] = typer.Option(None, help="Overrides translate.seed (dvc.yaml runs seeds 0-2 per variant)."),
    target: Path = typer.Option(
        ..., help="Target split (images to translate); in dvc.yaml: data/benchmark/target_train."
    ),
    source: Path = typer.Option(
        ..., help="Source split (the style to reach); in dvc.yaml: data/benchmark/source_train."
    ),
    out_dir: Path = typer.Option(
        ..., help="Models go to <out-dir>/<variant>/; in dvc.yaml: models/translator/seed<S>."
    ),
    reports_dir: Path = typer.Option(
        ..., help="Loss CSV, grid PNG and diagnostics JSON folder; in dvc.yaml: reports/translate/seed<S>."
    ),
) -> None:
    def body() -> None:
        section = dict(stage_config(params, "translate")["translate"])
        if variant is not None:
            section["variant"] = variant
        if seed is not None:
            section["seed"] = seed
        cfg = TranslateConfig.from_params(section, "translate", params)
        model_dir = out_dir / cfg.variant
        summary = train_translator(
            cfg,
            target,
            source,
            model_dir / "model.pt",
            model_dir / "train_state.pt",
            reports_dir / f"{cfg.variant}_losses.csv",
            reports_dir / f"{cfg.variant}_grid.png",
            reports_dir / f"{cfg.variant}_diagnostics.json",
        )
        sec = summary["seconds_per_iteration"]
        typer.echo(
            f"translate_train {cfg.variant}: {summary['iterations']} iterations (resumed from "
            f"{summary['resumed_from']}), fastest iteration {'-' if sec is None else f'{sec:.3f} s'}; "
            f"wrote {model_dir / 'model.pt'}"
        )

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

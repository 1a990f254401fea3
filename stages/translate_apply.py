"""Stage translate_apply: translate the target test images into the source style with one variant.

Writes ``<out-dir>/<variant>/<split name>/`` (in dvc.yaml: ``data/translated/seed<S>/<variant>/target_test``): the
translated images and a copy of ``annotations.json`` with the same ids, so that
``python stages/evaluate.py --model models/source/model.pt --data data/translated/seed<S>/<variant>/target_test
--name translate_<variant>_s<S>`` measures the frozen source detector on them. Reads params: translate.device
(and translate.variant when ``--variant`` is not given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vspa.config import stage_config
from vspa.translation.apply import translate_split
from vspa.translation.config import DEFAULT_VARIANT
from vspa.utils import VspaError, get_device, run_stage


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    variant: Optional[str] = typer.Option(
        None, help="cut | attention | attention_lg (default: translate.variant if set, else attention_lg)."
    ),
    data: Path = typer.Option(..., help="Split to translate; in dvc.yaml: data/benchmark/target_test."),
    models_dir: Path = typer.Option(
        ..., help="The translator is <models-dir>/<variant>/model.pt; in dvc.yaml: models/translator/seed<S>."
    ),
    out_dir: Path = typer.Option(
        ..., help="Output: <out-dir>/<variant>/<name of --data>; in dvc.yaml: data/translated/seed<S>."
    ),
) -> None:
    def body() -> None:
        cfg = stage_config(params, "translate")["translate"]
        name = variant or cfg.get("variant") or DEFAULT_VARIANT
        if "/" in name or name.startswith("."):
            raise VspaError(f"--variant '{name}': use cut, attention or attention_lg.")
        summary = translate_split(
            models_dir / name / "model.pt", data, out_dir / name / data.name, get_device(cfg.get("device") or "auto")
        )
        typer.echo(f"translate_apply {name}: {summary['images']} images -> {summary['out_dir']}")

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

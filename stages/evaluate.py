"""Stage evaluate: VOC AP50 per class and mAP of one checkpoint on one dataset split.

Writes ``<metrics-dir>/<name>.json`` (the DVC metrics: VOC and COCO-style AP50, mAP; small, kept in git; in
dvc.yaml: reports/metrics), ``<info-dir>/<name>.json`` (image, GT and detection counts, IoU, checkpoint and data
paths; reports/metrics/info) and ``<plots-dir>/<name>.csv`` (PR curves, class,recall,precision, at most 200
points per class; reports/plots/pr). The input and output paths are options without default, except
``--info-dir``, which falls back to ``<metrics-dir>/info`` (dvc.yaml passes it too). Reads params
(the section as :class:`vspa.evaluation.config.EvalConfig`): evaluate.device, evaluate.iou, evaluate.batch_size,
evaluate.subsets (optional, from the scenario preset: named subsets of the split's images scored on their own,
e.g. each fog level of Foggy Cityscapes; under "subsets" in the metrics file).
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.config import parse_section, stage_config
from vspa.evaluation.config import EvalConfig
from vspa.evaluation.runner import evaluate_model, split_metrics, write_pr_csv
from vspa.utils import VspaError, get_device, run_stage, write_json_atomic

PR_MAX_POINTS = 200


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    model: Path = typer.Option(..., help="Detector checkpoint."),
    data: Path = typer.Option(..., help="Split folder with annotations.json."),
    name: str = typer.Option("source_on_target", help="Output name: <metrics-dir>/<name>.json."),
    metrics_dir: Path = typer.Option(..., help="Folder of the metrics JSON; in dvc.yaml: reports/metrics."),
    plots_dir: Path = typer.Option(..., help="Folder of the PR-curve CSV; in dvc.yaml: reports/plots/pr."),
    info_dir: Path = typer.Option(
        None, help="Folder of <name>.json with the counts and provenance (default: <metrics-dir>/info)."
    ),
) -> None:
    def body() -> None:
        section = stage_config(params, "evaluate")["evaluate"]
        cfg = parse_section(EvalConfig, section, "evaluate", params)
        if not name or "/" in name or name.startswith("."):
            raise VspaError(f"--name '{name}': use a plain file name such as source_on_target.")
        metrics, curves = evaluate_model(
            model, data, get_device(cfg.device), cfg.batch_size, cfg.iou, subsets=cfg.subsets
        )
        results, info = split_metrics(metrics)
        write_pr_csv(plots_dir / f"{name}.csv", curves, max_points=PR_MAX_POINTS)
        info_folder = Path(info_dir) if isinstance(info_dir, (str, Path)) else Path(metrics_dir) / "info"  # also when
        # main() is called as a function (tests), where an omitted option is typer's OptionInfo
        write_json_atomic(
            info_folder / f"{name}.json", {"name": name, "checkpoint": str(model), "data": str(data), **info}
        )
        write_json_atomic(metrics_dir / f"{name}.json", results)
        ap = ", ".join(f"{c} {'-' if v is None else f'{v:.1f}'}" for c, v in metrics["AP"].items())
        m, iou = metrics["mAP"], cfg.iou
        typer.echo(f"{name}: mAP@{iou:g} {'-' if m is None else f'{m:.1f}'} ({ap}) on {metrics['num_images']} images")
        for sub, sm in metrics.get("subsets", {}).items():
            value = "-" if sm["mAP"] is None else f"{sm['mAP']:.1f}"
            typer.echo(f"  {sub}: mAP {value} on {sm['num_images']} images")

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

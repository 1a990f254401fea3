"""Stage extract_memory: the source detector's foreground and background memories, as one HDF5 file.

Writes ``--out`` (in dvc.yaml: models/memory/full.h5; see vspa.memory.store for the layout) and ``--stats``
(reports/memory/extract.json: entry counts, images per second); every path is an option without default.
Reads params (the section as :class:`vspa.memory.config.ExtractConfig`): extract_memory.keep (all | correct),
extract_memory.batch_size, extract_memory.device, extract_memory.chunk_rows.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.config import parse_section, stage_config
from vspa.data.coco import DetectionDataset, dataset_sha256
from vspa.detection import checkpoint
from vspa.memory.config import ExtractConfig
from vspa.memory.extract import extract_memory
from vspa.utils import VspaError, get_device, run_stage, sha256_file, write_json_atomic


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    model: Path = typer.Option(..., help="Source detector checkpoint; in dvc.yaml: models/source/model.pt."),
    data: Path = typer.Option(
        ..., help="Labelled source split (annotations.json); in dvc.yaml: data/benchmark/source_train."
    ),
    out: Path = typer.Option(..., help="Output memory file; in dvc.yaml: models/memory/full.h5."),
    stats: Path = typer.Option(..., help="Output extraction statistics; in dvc.yaml: reports/memory/extract.json."),
) -> None:
    def body() -> None:
        section = stage_config(params, "extract_memory")["extract_memory"]
        cfg = parse_section(ExtractConfig, section, "extract_memory", params)
        device = get_device(cfg.device)
        detector, meta = checkpoint.load(model, device)
        json_path = data / "annotations.json"
        dataset = DetectionDataset(json_path)
        if list(dataset.class_names) != list(meta["class_names"]):
            raise VspaError(
                f"{json_path}: classes {dataset.class_names} differ from the checkpoint's {meta['class_names']} "
                f"({model}). Extract from the split the detector was trained on."
            )
        result = extract_memory(
            detector,
            dataset,
            out,
            device=device,
            keep=cfg.keep,
            batch_size=cfg.batch_size,
            chunk_rows=cfg.chunk_rows,
            attrs={
                "checkpoint_sha256": sha256_file(model),
                "dataset_sha256": dataset_sha256(json_path),
                "checkpoint": str(model),
                "dataset": str(data),
            },
        )
        write_json_atomic(stats, {**result.to_dict(), "device": str(device), "memory": str(out)})
        typer.echo(
            f"{out}: {result.fg_rows} foreground entries ({result.fg_dropped} misclassified dropped), "
            f"{result.bg_rows} background entries from {result.images} images ({result.images_per_s:.1f} images/s)"
        )

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

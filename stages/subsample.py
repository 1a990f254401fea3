"""Stage subsample: coreset (greedy k-center) or random subset of the source memories.

Writes ``--out`` (in dvc.yaml: models/memory/subsampled.h5; the full memory's schema plus fg/index and bg/index,
each kept row's place in the full ``--memory``) and ``--coverage`` (reports/memory/coverage.json: entries, kept
and coverage radius per class and for the background, next to a random subset's radius); every path is an option
without default. Reads params (the section as :class:`vspa.coreset.config.SubsampleConfig`):
subsample.method (coreset | random | none), subsample.fg_ratio, subsample.bg_ratio, subsample.projection_dim
(0 = none), subsample.seed, subsample.device.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.config import parse_section, stage_config
from vspa.coreset.config import SubsampleConfig
from vspa.coreset.kcenter import subsample_memory
from vspa.memory.store import open_memory, write_memory
from vspa.utils import get_device, run_stage, sha256_file, write_json_atomic


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    memory: Path = typer.Option(..., help="Full memory file; in dvc.yaml: models/memory/full.h5."),
    out: Path = typer.Option(..., help="Output subsampled memory file; in dvc.yaml: models/memory/subsampled.h5."),
    coverage: Path = typer.Option(..., help="Output coverage report; in dvc.yaml: reports/memory/coverage.json."),
) -> None:
    def body() -> None:
        section = stage_config(params, "subsample")["subsample"]
        cfg = parse_section(SubsampleConfig, section, "subsample", params)
        bank = open_memory(memory)
        subset, report = subsample_memory(
            bank,
            method=cfg.method,
            fg_ratio=cfg.fg_ratio,
            bg_ratio=cfg.bg_ratio,
            projection_dim=cfg.projection_dim,
            seed=cfg.seed,
            device=get_device(cfg.device),
            progress=None,
        )
        subset.attrs["full_memory_sha256"] = sha256_file(memory)
        write_memory(out, subset)
        write_json_atomic(coverage, {**report, "memory": str(out), "full_memory": str(memory)})
        fg, bg = report["fg"], report["bg"]
        typer.echo(
            f"{out}: kept {fg['kept']}/{fg['entries']} foreground (radius {fg['radius']:.3f}, random "
            f"{fg['random_radius']:.3f}) and {bg['kept']}/{bg['entries']} background (radius {bg['radius']:.3f}, "
            f"random {bg['random_radius']:.3f}) by {report['method']}"
        )

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

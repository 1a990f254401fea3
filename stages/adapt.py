"""Stage adapt: mean-teacher adaptation with memory-based foreground/background alignment (one run).

Reads params: scenario, adapt.* and, when present, the override section ``adapt_<name>`` (its non-null keys
replace those of ``adapt``), so dvc.yaml can run several variants from this module, e.g.
``--name at_like`` (section ``adapt_at_like``: fg_mode off, bg_mode off) and ``--name vspa``. ``--seed``
overrides ``adapt.seed`` (one run per seed without one section per seed).

``fg_mode: pairing`` (the AugSim -> FoggyAugSim experiment, e.g. ``--name pairing_exact`` with section
``adapt_pairing_exact``) also reads the pairing sets named by ``pairing_original`` and ``pairing_variants``
and pairs the objects of ``--target`` with them; ``--memory`` gives the negatives.

Writes ``<out>/model.pt`` (the final teacher, a detector checkpoint for the evaluate stage; never chosen on
target test), ``<log-dir>/losses.csv`` (losses per iteration, for ``dvc plots``), ``<log-dir>/summary.json``
(timings per iteration, incl. the alignment + retrieval part, and counts), and the diagnostics of
:mod:`vspa.adaptation.diagnostics`: ``<log-dir>/diagnostics.json`` (DVC metrics: discriminator accuracies,
active triplets, gradient shares, pseudo-label precision / recall), ``diagnostics.csv`` and ``grad_shares.csv``
(DVC plots). The resumable training state
and any refreshed memory stay in ``<out>/work/``. Every path is an option without default (dvc.yaml passes them
all; for ``--name vspa``: ``--out models/adapt/vspa --log-dir reports/adapt/vspa``).
Multi-process: torchrun --nproc_per_node=N stages/adapt.py --name ... (the options of the stage's cmd).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from vspa.adaptation.trainer import AdaptConfig, AdaptData, adapt, build_pairing_table, input_fingerprint
from vspa.config import effective_params
from vspa.utils import VspaError, load_params, run_stage, seed_everything, write_json_atomic


def adapt_section(params: dict, name: str, path: str = "params.yaml") -> dict:
    """The effective ``adapt`` section with the non-null keys of ``adapt_<name>`` (if any) laid over it."""
    merged = effective_params(params)
    if not isinstance(merged.get("adapt"), dict):
        raise VspaError(f"{path}: missing section 'adapt:'. Add it (see the README's params table).")
    section = dict(merged["adapt"])
    override = params.get(f"adapt_{name}")
    if override is not None:
        if not isinstance(override, dict):
            raise VspaError(f"{path}: section 'adapt_{name}:' must be a mapping of adapt keys to values.")
        section.update({k: v for k, v in override.items() if v is not None})
    return section


def main(
    params: str = typer.Option("params.yaml", help="Params file."),
    name: str = typer.Option("vspa", help="Run name: reads the optional override section adapt_<name>."),
    model: Path = typer.Option(
        ..., help="Source detector checkpoint (student's start); in dvc.yaml: models/source/model.pt."
    ),
    source: Path = typer.Option(..., help="Labelled source split folder; in dvc.yaml: data/benchmark/source_train."),
    target: Path = typer.Option(..., help="Unlabelled target split folder; in dvc.yaml: data/benchmark/target_train."),
    memory: Path = typer.Option(..., help="Memory file (read only if used); in dvc.yaml: models/memory/subsampled.h5."),
    out: Path = typer.Option(..., help="Output folder; in dvc.yaml: models/adapt/<name>."),
    log_dir: Path = typer.Option(
        ..., help="Losses, summary, diagnostics and gradient-share logs; in dvc.yaml: reports/adapt/<name>."
    ),
    seed: int = typer.Option(None, help="Overrides adapt.seed (default: the params' seed)."),
) -> None:
    def body() -> None:
        from vspa.data.coco import DetectionDataset
        from vspa.detection import checkpoint, distributed
        from vspa.detection.model import DetectorConfig
        from vspa.detection.train import IMAGE_CACHE_MB

        if not name or "/" in name or name.startswith("."):
            raise VspaError(f"--name '{name}': use a plain name such as vspa or at_like.")
        raw = load_params(params)
        section = adapt_section(raw, name, params)
        if seed is not None:
            section["seed"] = seed
        section_name = f"adapt (+ adapt_{name})"
        cfg = AdaptConfig.from_params(section, name=section_name, path=params)
        out_dir, logs = Path(out), Path(log_dir)
        source_json, target_json = source / "annotations.json", target / "annotations.json"
        memory_path = memory if cfg.needs_memory else None
        ctx = distributed.setup(cfg.device)
        if ctx.is_main and cfg.amp and (cfg.use_fg or cfg.use_bg):
            print(
                f"[adapt:{name}] note: adapt.amp is true. With mixed-precision adaptation VSPA's teacher drifted on 3 "
                "of 4 seeds of the embedded benchmark (float32: 2 of 18); the defaults and the protocol's tables are "
                "float32 (README: 'Where the drift enters').",
                file=sys.stderr,
            )
        student, meta = checkpoint.load(model, ctx.device)
        src_ds = DetectionDataset(source_json, cache_mb=IMAGE_CACHE_MB)
        tgt_ds = DetectionDataset(target_json, cache_mb=IMAGE_CACHE_MB)
        if list(src_ds.class_names) != list(meta["class_names"]):
            raise VspaError(
                f"{source_json}: classes {src_ds.class_names} differ from the checkpoint's {meta['class_names']} "
                f"({model}). Adapt the detector that was trained on this source split."
            )
        data = AdaptData(
            source=src_ds,
            target=tgt_ds,
            memory_path=memory_path,
            fingerprint=input_fingerprint(model, source_json, target_json, memory_path),
            pairing_table=build_pairing_table(cfg, target, section_name, params) if cfg.use_pairing else None,
        )
        if ctx.is_main:
            print(
                f"[adapt:{name}] fg {cfg.fg_mode if cfg.use_fg else 'off'}"
                + (f" ({cfg.pairing_mode})" if cfg.use_pairing else "")
                + f", bg {cfg.bg_mode if cfg.use_bg else 'off'}, "
                f"img {'on' if cfg.use_img else 'off'}; {cfg.iterations} iterations of "
                f"{cfg.batch_size}+{cfg.batch_size} images, lr {cfg.lr:g}, tau {cfg.tau:g} on {ctx.device}"
                + (f" x {ctx.world_size} processes" if ctx.enabled else "")
                + f"; memory {memory_path or '-'} -> {out_dir}",
                file=sys.stderr,
            )
        seed_everything(cfg.seed)  # the discriminators' initial weights
        teacher, summary = adapt(student, data, cfg, out_dir / "work", logs / "losses.csv")
        if ctx.is_main:
            model_cfg: DetectorConfig = meta["config"]
            extra = {
                "stage": "adapt",
                "name": name,
                "adapt": cfg.record(),
                "source_model": str(model),
                "memory": str(memory_path) if memory_path else None,
                "selected": "final teacher",
            }
            checkpoint.save(out_dir / "model.pt", teacher, model_cfg, meta["class_names"], extra=extra)
            diag = summary.pop("diagnostics")
            write_json_atomic(logs / "summary.json", {"name": name, **summary})
            write_json_atomic(logs / "diagnostics.json", {"name": name, **diag})
            print(
                f"[adapt:{name}] wrote {out_dir / 'model.pt'}; {summary['sec_per_iter']:.3f} s/iteration "
                f"(alignment + retrieval {summary['align_sec_per_iter']:.3f} s), "
                f"{summary['pseudo_labels_per_image']:.2f} pseudo-labels per image; second half: "
                f"bg discriminator accuracy {diag['second_half']['bg_disc_acc']}, "
                f"active triplets {diag['second_half']['fg_active']}; gradient shares {diag['grad_share']}",
                file=sys.stderr,
            )
        distributed.cleanup(ctx)

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

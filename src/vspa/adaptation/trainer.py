"""Adaptation training: a mean teacher (Adaptive Teacher) with memory-based foreground/background alignment.

One iteration (method spec section 5):

1. a global batch of labelled source images and of unlabelled target images (``batch_size`` each, split
   over the processes); every image gets the weak augmentation (flip), and a strong (photometric) view of it;
2. the teacher (EMA of the student, eval mode, no gradient) detects on the weak target views; detections
   with score >= ``tau`` are the pseudo-labels;
3. the student's losses: supervised on the source weak + strong views (all four Faster R-CNN losses);
   unsupervised on the strong target views with the pseudo-labels (RPN objectness + ROI classification, no
   box regression) x ``lambda_unsup``; image-level adversarial loss (discriminator on the backbone map,
   gradient reversal) weighted by ``lambda_img``; foreground triplet loss x ``lambda_fg``; background
   adversarial loss weighted by ``lambda_bg`` (see :mod:`vspa.adaptation.align`);
4. one SGD step for the student and the discriminators, then the EMA update of the teacher;
5. every ``refresh_every`` iterations the memory is extracted again from the source split with the current
   student (or teacher) and subsampled again with the method and ratios recorded in the memory file.
   Rank 0 builds it and writes it, the other processes read the same file after a barrier.

Determinism: every random draw of iteration ``k`` comes from generators seeded by ``(seed, k, ...)``
(:func:`vspa.training.seeds.derive_seed`), so the state at a checkpoint is a function of the iteration, and
a run killed and resumed from its last checkpoint gives bit-identical weights on the CPU.

Alignment view (``align_view``). With ``weak`` (default) the image discriminator compares the weak source
views with the weak target views, as Adaptive Teacher does, and the foreground / background target features
come from the student's map of the weak target views: the views the teacher labelled and, like the memory
(extracted without augmentation), free of photometric augmentation, so a discriminator cannot tell the
domains apart by the augmentation alone. It costs one more student backbone pass over the target images.
``strong`` reuses the maps of the supervised / unsupervised passes instead. For both adversarial terms the
detector receives ``-lambda`` times the gradient of the discriminator's loss; by default
(``disc_full_rate``) the discriminators themselves learn at the full learning rate (see
:meth:`vspa.adaptation.step.StudentStep._adversarial_weights`).

Controlled pairs (``fg_mode: pairing``, the visual-similarity experiment of paper 3.2 with AugSim as the
source and FoggyAugSim as the target; :mod:`vspa.adaptation.pairing`). The positive of a target instance is
not retrieved but the source version of the same object whose appearance differs in exactly the attributes
``pairing_mode`` names (``exact``: none, ``color``, ``flip``, ``color_flip``). Before training, a
:class:`~vspa.adaptation.pairing.PairingBank` of those counterparts is embedded with the student (the pair
table comes from ``pairing_original``, ``pairing_variants`` and the target split); it is embedded again at
every memory refresh with the refresh model and is part of the resumable state. The anchors are the same
target instances as in ``fg_mode: memory`` (detections with score >= ``tau``); each is matched to a
ground-truth object of its (weak-view) target image by IoU >= 0.5, so this mode reads the target's boxes and
object ids (never its labels), and anchors matching no object are dropped. The weak view's mirror flag
selects the counterpart of the mirrored object. Negatives are drawn from the usual memory as in
``fg_mode: memory``, so the mode needs the memory file.

This module holds the training loop (:func:`adapt`), its resumable state and its logs; the plumbing shared
with the detector's loop (seed streams, state file, schedule, loss log, divergence check) is in
:mod:`vspa.training`. The configuration is in :mod:`vspa.adaptation.config`, the losses of one iteration in
:mod:`vspa.adaptation.step`, the inputs and the batches in :mod:`vspa.adaptation.data`, the memory's state and
refresh in :mod:`vspa.adaptation.bank`; their public names are re-exported here. (:func:`adapt` is one
explicit, hook-free loop body of about 220 lines, and this docstring describes the whole method.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vspa.adaptation import diagnostics
from vspa.adaptation.bank import _bank_from_state, _bank_state, refresh_memory
from vspa.adaptation.config import AdaptConfig
from vspa.adaptation.data import _ALIGN, _SAMPLER, AdaptData, _batch, build_pairing_table, pairing_fingerprint
from vspa.adaptation.pairing import PairingBank
from vspa.adaptation.pseudo import filter_pseudo_labels
from vspa.adaptation.step import StudentStep, _timer, student_detections
from vspa.adaptation.teacher import ema_update, make_teacher, teacher_detect
from vspa.detection import checkpoint as detector_checkpoint
from vspa.detection import distributed
from vspa.detection.model import LOSS_NAMES, Detector
from vspa.memory.retrieval import Retriever
from vspa.memory.store import MemoryBank, open_memory
from vspa.training.guard import check_finite
from vspa.training.log import write_log
from vspa.training.precision import Precision
from vspa.training.prefetch import Prefetcher, default_workers, pinned, to_device
from vspa.training.schedule import sgd_with_schedule
from vspa.training.seeds import derive_seed
from vspa.training.state import code_digest, load_state, save_state
from vspa.utils import VspaError, rng_state, set_rng_state, sha256_file, sha256_json, write_text_atomic

# this module's API and, re-exported on purpose, the public names of the modules split off it (stages,
# benchmarks and tests import them from here)
__all__ = [
    "CSV_COLUMNS",
    "STATE_FORMAT",
    "AdaptConfig",
    "AdaptData",
    "StudentStep",
    "adapt",
    "build_pairing_table",
    "input_fingerprint",
    "pairing_fingerprint",
    "refresh_memory",
    "student_detections",
    "summarize",
]

STATE_FORMAT = "vspa-adapt-state/1"
CSV_COLUMNS = (
    "iteration",
    "lr",
    *LOSS_NAMES,
    "loss_sup",
    "unsup_objectness",
    "unsup_classifier",
    "loss_unsup",
    "loss_img",
    "loss_fg",
    "loss_bg",
    "total",
    "pseudo_per_image",
    "fg_pairs",
    "time_iter",
    "time_align",
)


def adapt(
    student: Detector,
    data: AdaptData,
    cfg: AdaptConfig,
    work_dir: str | Path,
    log_csv: str | Path,
    progress: bool = True,
) -> tuple[Detector, dict]:
    """Adapt ``student`` (the source detector; trained in place) and return ``(teacher, summary)``.

    ``work_dir/last.pt`` holds the resumable state (student, teacher, optimizer with the discriminators,
    memory, pairing bank, RNG, iteration, log rows), written atomically every ``checkpoint_every`` iterations
    and at the end; a call with the same configuration and inputs resumes from it. Refreshed memories are written to
    ``work_dir/memory_refresh.h5``. ``summary`` holds the mean timings and counts; rank 0 writes the CSV.
    """
    world_size = distributed.env_world_size()
    if cfg.batch_size % world_size:
        raise VspaError(
            f"params.yaml: adapt.batch_size {cfg.batch_size} is not divisible by the {world_size} processes. "
            f"Change batch_size or torchrun's --nproc_per_node."
        )
    for name, ds in (("source", data.source), ("target", data.target)):
        if len(ds) == 0:
            raise VspaError(f"adapt: the {name} split has no images. Check its annotations.json.")
        if list(ds.class_names) != list(data.source.class_names):
            raise VspaError(
                f"adapt: the target split's classes {list(ds.class_names)} differ from the source's "
                f"{list(data.source.class_names)}. Both domains need the same label space, in the same order."
            )
    if student.num_classes != len(data.source.class_names):
        raise VspaError(
            f"adapt: the source detector has {student.num_classes} classes, the source split "
            f"{len(data.source.class_names)}. Pretrain on this split first."
        )
    if cfg.needs_memory and data.memory_path is None:
        raise VspaError("adapt: fg_mode/bg_mode use the memory but no memory file was given (--memory PATH).")
    if cfg.use_pairing and data.pairing_table is None:
        raise VspaError("adapt: fg_mode pairing needs the pair table (AdaptData.pairing_table; build_pairing_table).")

    ctx = distributed.setup(cfg.device)
    device = ctx.device
    work_dir, log_csv = Path(work_dir), Path(log_csv)
    state_path = work_dir / "last.pt"
    refresh_path = work_dir / "memory_refresh.h5"

    student.to(device).train()
    teacher = make_teacher(student)
    step_module = StudentStep(student, cfg).to(device)
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer, scheduler = sgd_with_schedule(params, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_factor)
    precision = Precision(cfg.amp, device)
    inputs = data.fingerprint
    if cfg.use_pairing:
        inputs = {**inputs, "pairing": pairing_fingerprint(data.pairing_table)}
    fingerprint = sha256_json(
        {
            "adapt": {k: v for k, v in cfg.record().items() if k not in ("device", "checkpoint_every")},
            "model": student.cfg.to_dict(),
            "inputs": inputs,
            "code": code_digest(),  # a state written by other code is not resumed (vspa.training.state)
        }
    )

    bank: MemoryBank | None = None
    if cfg.needs_memory:
        bank = open_memory(data.memory_path, expected_dim=student.embed_dim)
        if bank.class_names != list(data.source.class_names):
            raise VspaError(
                f"{data.memory_path}: memory classes {bank.class_names} differ from the source split's "
                f"{list(data.source.class_names)}. Re-extract the memory from this source split."
            )

    start, rows, refresh_seconds = 0, [], []
    # None: missing, foreign or unreadable (vspa.training.state); not weights_only: the state holds RNG states
    state = load_state(state_path, STATE_FORMAT, fingerprint, "adapt", weights_only=False)
    if state is not None:
        step_module.load_state_dict(state["step"])  # the student and the discriminators
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state.get("scaler"))
        if state["memory"] is not None:
            bank = _bank_from_state(state["memory"])
        set_rng_state(state["rng"])
        start, rows, refresh_seconds = int(state["iteration"]), list(state["rows"]), list(state["refresh_seconds"])
        if ctx.is_main:
            print(f"[adapt] resuming from {state_path} at iteration {start}/{cfg.iterations}", file=sys.stderr)

    pair_bank: PairingBank | None = None
    if cfg.use_pairing:
        if state is not None and state.get("pairing") is not None:
            pair_bank = PairingBank.from_state(state["pairing"])  # the bank of the last refresh
        else:  # every process embeds the same counterparts with the same weights (eval mode, no random draw)
            pair_bank = PairingBank.extract(
                student, data.pairing_table, cfg.pairing_mode, progress=progress and ctx.is_main
            )
        step_module.pairing_bank = pair_bank

    def use_memory(new_bank: MemoryBank | None) -> None:
        step_module.retriever = Retriever(new_bank, device) if new_bank is not None else None
        if new_bank is not None:
            step_module.aligner.set_memory(new_bank, device)

    use_memory(bank)
    model = step_module
    if ctx.enabled:
        model = DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # e.g. no pseudo-label in a batch: the box head gets no fg gradient
        )

    def checkpoint(iteration: int) -> None:
        if ctx.is_main:
            payload = {
                "step": step_module.state_dict(),
                "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                **({"scaler": precision.state_dict()} if precision.enabled else {}),
                "memory": _bank_state(bank) if bank is not None and bank.path != data.memory_path else None,
                "pairing": pair_bank.state_dict() if pair_bank is not None else None,
                "rng": rng_state(),
                "rows": rows,
                "refresh_seconds": refresh_seconds,
            }
            save_state(state_path, STATE_FORMAT, fingerprint, iteration, payload)
            _write_logs(log_csv, rows)
        distributed.barrier(ctx)

    share = cfg.batch_size // ctx.world_size
    positions = range(ctx.rank * share, (ctx.rank + 1) * share)
    bar = tqdm(
        range(start, cfg.iterations),
        initial=start,
        total=cfg.iterations,
        desc="adapt",
        unit="it",
        disable=(None if progress else True) if ctx.is_main else True,
    )

    def make_batch(it: int) -> tuple:
        """Iteration ``it``'s batches on the CPU (a function of the seed and ``it``: made ahead in a data thread
        on CUDA, see vspa.training.prefetch)."""
        *views, pairs = _batch(data, cfg, it, positions, "cpu")
        return pinned(views, pin), pairs  # the pairing ground truth stays on the CPU, unpinned

    workers = default_workers(device)
    pin = workers > 0 and device.type == "cuda"  # pinned in the data thread, copied asynchronously
    prefetcher = Prefetcher(make_batch, range(start, cfg.iterations), workers)
    batches = iter(prefetcher)
    detector_ids = {id(p) for p in student.parameters()}
    try:
        for it in bar:
            t_iter: list[float] = []
            t_backward: list[float] = []
            step_module.iteration = it
            with _timer(device, t_iter):
                views, tgt_pairs = next(batches)
                src_images, src_targets, tgt_weak, tgt_strong = to_device(views, device)
                # without a target loss (fair source only) there are no target images: the teacher is only the EMA
                with precision.autocast():
                    detections = teacher_detect(teacher, tgt_weak) if tgt_weak else []
                pseudo = filter_pseudo_labels(
                    [{k: v.float() if k != "labels" else v for k, v in d.items()} for d in detections], cfg.tau
                )
                pseudo_targets = [{"boxes": p["boxes"], "labels": p["labels"]} for p in pseudo]

                torch.manual_seed(derive_seed(cfg.seed, it, ctx.rank, _SAMPLER))
                generator = torch.Generator().manual_seed(derive_seed(cfg.seed, it, ctx.rank, _ALIGN))
                lr = optimizer.param_groups[0]["lr"]
                with precision.autocast():
                    if cfg.use_pairing:
                        losses = model(
                            src_images, src_targets, tgt_weak, tgt_strong, pseudo_targets, generator, tgt_pairs
                        )
                    else:
                        losses = model(src_images, src_targets, tgt_weak, tgt_strong, pseudo_targets, generator)
                n_tgt = max(len(pseudo), 1)
                losses["pseudo_per_image"] = losses["total"].new_tensor(sum(len(p["labels"]) for p in pseudo) / n_tgt)
                # diagnostic only: the target's labels are compared with the pseudo-labels and logged, nothing more
                tp, n_pseudo, n_gt = diagnostics.pseudo_label_counts(pseudo, tgt_pairs)
                for key, value in (("pseudo_tp", tp), ("pseudo_n", n_pseudo), ("gt_n", n_gt)):
                    losses[key] = losses["total"].new_tensor(value / n_tgt)
                terms = losses.pop("terms")
                names = [c for c in CSV_COLUMNS + diagnostics.ITER_COLUMNS if c in losses and c != "time_align"]
                names = list(dict.fromkeys(names))
                logged = distributed.all_reduce_mean(torch.stack([losses[k].detach().float() for k in names]), ctx)
                values = dict(zip(names, logged.cpu().tolist()))
                check_finite(
                    values,
                    it + 1,
                    "adaptation",
                    f"Lower adapt.lr (now {cfg.lr:g}) or the loss weights.",
                    keys=["total"],
                )  # the total is checked; every column is in the message
                optimizer.zero_grad(set_to_none=True)
                sample = bool(cfg.diag_every) and it % cfg.diag_every == 0 and not ctx.enabled
                with _timer(device, t_backward):
                    if sample:  # the same gradient, term by term, with each term's norm on the detector
                        scaled = {k: precision.scale(v) if v.requires_grad else v for k, v in terms.items()}
                        shares = diagnostics.shares(diagnostics.term_gradients(scaled, params, detector_ids))
                    else:
                        precision.backward(losses["total"])
                        shares = {k: float("nan") for k in diagnostics.SHARE_COLUMNS[1:-1]}
                precision.step(optimizer)
                scheduler.step()
                ema_update(teacher, student, cfg.ema_keep)
            rows.append(
                {
                    "iteration": it + 1,
                    "lr": lr,
                    **values,
                    "fg_pairs": values["fg_pairs"] * ctx.world_size,  # the mean over processes -> the total
                    "time_iter": t_iter[0],
                    "time_align": float(losses["time_align"]),
                    "time_backward": t_backward[0],
                    **shares,
                }
            )
            bar.set_postfix(loss=f"{values['total']:.3f}", pseudo=f"{values['pseudo_per_image']:.1f}")

            done = it + 1
            if cfg.refresh_every and bank is not None and done % cfg.refresh_every == 0 and done < cfg.iterations:
                refresh_start = time.perf_counter()
                source_model = student if cfg.refresh_model == "student" else teacher
                if ctx.is_main:
                    refresh_memory(source_model, data.source, bank, refresh_path, device, progress and ctx.is_main)
                distributed.barrier(ctx)
                bank = open_memory(refresh_path, expected_dim=student.embed_dim)
                use_memory(bank)
                if pair_bank is not None:  # the counterparts embedded by the same model as the memory
                    pair_bank = PairingBank.extract(
                        source_model, data.pairing_table, cfg.pairing_mode, progress=progress and ctx.is_main
                    )
                    step_module.pairing_bank = pair_bank
                refresh_seconds.append(time.perf_counter() - refresh_start)
            if cfg.snapshot_every and done % cfg.snapshot_every == 0 and done < cfg.iterations and ctx.is_main:
                detector_checkpoint.save(
                    work_dir / f"teacher_{done}.pt",
                    teacher,
                    teacher.cfg,
                    list(data.source.class_names),
                    extra={"stage": "adapt", "snapshot": done},
                )
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                checkpoint(done)
    finally:
        prefetcher.close()  # stops the data threads also when the loop ends in an error
    bar.close()
    if start >= cfg.iterations and ctx.is_main:
        _write_logs(log_csv, rows)
    distributed.barrier(ctx)
    summary = summarize(rows, refresh_seconds, cfg)
    summary["diagnostics"] = diagnostics.summarize_diagnostics(rows)
    return teacher, summary


def _write_logs(log_csv: Path, rows: list[dict]) -> None:
    """``losses.csv``, and beside it ``diagnostics.csv`` and ``grad_shares.csv`` (atomic writes)."""
    write_log(log_csv, rows, CSV_COLUMNS)
    write_text_atomic(log_csv.with_name("diagnostics.csv"), diagnostics.iteration_csv_text(rows))
    write_text_atomic(log_csv.with_name("grad_shares.csv"), diagnostics.shares_csv_text(rows))


def summarize(rows: list[dict], refresh_seconds: list[float], cfg: AdaptConfig) -> dict:
    """Mean time per iteration (all of it, and the alignment + retrieval part), refresh time and counts."""
    if not rows:
        return {"iterations": 0}
    # the first iterations include one-off costs (allocations, caches): leave out the first 10% (at most 20)
    skip = min(20, len(rows) // 10)
    timed = rows[skip:]
    mean_iter = float(np.mean([r["time_iter"] for r in timed]))
    mean_align = float(np.mean([r["time_align"] for r in timed]))
    return {
        "iterations": len(rows),
        "sec_per_iter": mean_iter,
        "align_sec_per_iter": mean_align,
        "align_fraction": mean_align / mean_iter if mean_iter > 0 else float("nan"),
        "refreshes": len(refresh_seconds),
        "refresh_seconds_total": float(sum(refresh_seconds)),
        "pseudo_labels_per_image": float(np.mean([r["pseudo_per_image"] for r in rows])),
        "fg_pairs_per_iter": float(np.mean([r["fg_pairs"] for r in rows])),
        "final_losses": {k: rows[-1][k] for k in ("loss_sup", "loss_unsup", "loss_img", "loss_fg", "loss_bg", "total")},
        "fg_mode": cfg.fg_mode,
        "bg_mode": cfg.bg_mode,
        "timed_iterations": len(timed),
        **({"pairing_mode": cfg.pairing_mode} if cfg.fg_mode == "pairing" else {}),
    }


def input_fingerprint(source_ckpt: Path, source_json: Path, target_json: Path, memory: Path | None) -> dict:
    """Hashes of the inputs of an adaptation run (part of the resume fingerprint)."""
    fixes = {
        "source model": "run `dvc repro pretrain` or pass --model",
        "source data": "run `dvc repro prepare` or pass --source",
        "target data": "run `dvc repro prepare` or pass --target",
        "memory": "create it with `dvc repro extract_memory subsample` or pass --memory",
    }
    paths = {"source model": source_ckpt, "source data": source_json, "target data": target_json, "memory": memory}
    out = {}
    for what, path in paths.items():
        if path is None:
            out[what] = None
            continue
        if not Path(path).is_file():
            raise VspaError(f"{path}: {what} file not found; {fixes[what]}.")
        out[what] = sha256_file(path)
    return out

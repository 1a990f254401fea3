"""Supervised detector training: SGD by iterations, resumable, deterministic, optionally multi-process.

Every random draw of iteration ``k`` comes from generators seeded with ``(seed, k, ...)``: which images
form the global batch (a fresh permutation of the dataset each epoch), each image's augmentation (seeded
by its position in the global batch, so it does not depend on the number of processes) and the RPN / ROI
samplers (torch's global generator, reseeded every iteration). The random state at a checkpoint is thus a
function of the iteration, and a run killed and resumed from the checkpoint of iteration ``k`` gives the
same weights, bit for bit on the CPU, as a run that never stopped.

``work_dir/last.pt`` holds the training state (weights, optimizer, scheduler, iteration, loss rows); it is
written atomically every ``checkpoint_every`` iterations and at the end, and a new call resumes from it
when it was made with the same configuration (otherwise it starts over: :mod:`vspa.training.state`). The
seed streams, state file, schedule, loss log and divergence check are the shared :mod:`vspa.training`
modules; the loop body below stays explicit.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vspa.config import check_device, check_number, parse_section, stage_config
from vspa.data import transforms
from vspa.data.coco import DetectionDataset, dataset_sha256
from vspa.detection import checkpoint, distributed
from vspa.detection.model import LOSS_NAMES, Detector, DetectorConfig, build_detector
from vspa.training import schedule
from vspa.training import state as state_file  # (save_state is the loop's closure below)
from vspa.training.guard import check_finite
from vspa.training.log import write_log
from vspa.training.precision import Precision
from vspa.training.prefetch import Prefetcher, default_workers, pinned, to_device
from vspa.training.schedule import WARMUP_FACTOR, sgd_with_schedule
from vspa.training.seeds import BATCH_ORDER, derive_seed, global_batch
from vspa.utils import VspaError, seed_everything, sha256_json

# re-exported: other modules and tests import these names from here
__all__ = [
    "CSV_COLUMNS",
    "STATE_FORMAT",
    "WARMUP_FACTOR",
    "TrainConfig",
    "derive_seed",
    "global_batch",
    "run_training_stage",
    "train_detector",
]

CSV_COLUMNS = ("iteration", "lr", *LOSS_NAMES, "total")
STATE_FORMAT = "vspa-train-state/1"
IMAGE_CACHE_MB = 1024  # decoded training images kept in memory (per dataset and process): each is decoded once

# Streams of random numbers drawn from (seed, iteration, ...): kept apart by a stream id (vspa.training.seeds).
_ORDER, _AUG, _SAMPLER = BATCH_ORDER, 1, 2


@dataclass(kw_only=True)
class TrainConfig:
    """The ``pretrain`` / ``oracle`` params section (parsed by :func:`vspa.config.parse_section`).

    The values are in conf/config.yaml and the scenario presets (composed into params.yaml); a field has a default
    here only when no conf file states it (tests/test_config_defaults.py): today none has.
    """

    iterations: int
    batch_size: int
    lr: float
    seed: int
    device: str
    momentum: float
    weight_decay: float
    warmup_iters: int
    lr_steps: list[int]  # iterations at which lr is multiplied by 0.1
    strong_aug: bool
    checkpoint_every: int
    amp: bool  # mixed precision (float16 on CUDA, bfloat16 on the CPU): vspa.training.precision

    @classmethod
    def from_params(cls, section: dict | None, name: str = "pretrain", path: str = "params.yaml") -> "TrainConfig":
        """The effective params section ``name`` parsed by :func:`vspa.config.parse_section` (``null`` = the
        default; unknown keys, missing required values, wrong types and bad values are VspaErrors naming
        ``path`` and the key)."""
        return parse_section(cls, section, name, path)

    def validate(self, name: str = "pretrain", path: str = "params.yaml") -> None:
        checks = [  # (ok, key, requirement)
            *schedule.sgd_checks(self),
            (self.lr_steps == sorted(self.lr_steps), "lr_steps", "increasing"),
        ]
        for ok, key, requirement in checks:
            check_number(ok, getattr(self, key), f"{name}.{key}", requirement, path)
        check_device(self.device, f"{name}.device", path)

    def record(self) -> dict:
        """The configuration as a plain dict; ``amp`` only when on (so records of fp32 runs are as before)."""
        out = dataclasses.asdict(self)
        if not self.amp:
            out.pop("amp")
        return out

    def lr_factor(self, iteration: int) -> float:
        """Multiplier of ``lr`` at a 0-based iteration: linear warm-up, then x0.1 at each step passed
        (:func:`vspa.training.schedule.lr_factor`)."""
        return schedule.lr_factor(iteration, self.warmup_iters, self.lr_steps)


def _augment(image: torch.Tensor, target: dict, generator: torch.Generator, strong_aug: bool):
    image, target = transforms.weak(image, target, generator)
    if strong_aug:
        image = transforms.strong(image, generator)
    return image, target


def _fingerprint(cfg: TrainConfig, detector: Detector, dataset_id: str) -> str:
    """What a resumed run must share with the run that wrote the checkpoint."""
    train = {k: v for k, v in cfg.record().items() if k not in ("device", "checkpoint_every")}
    return sha256_json(
        {
            "train": train,
            "model": detector.cfg.to_dict(),
            "num_classes": detector.num_classes,
            "data": dataset_id,
            "code": state_file.code_digest(),
        }
    )


def train_detector(
    dataset,
    detector: Detector,
    cfg: TrainConfig,
    work_dir: str | Path,
    log_csv: str | Path,
    progress: bool = True,
    dataset_id: str | None = None,
) -> Detector:
    """Train ``detector`` on ``dataset`` (``ds[i] -> (image, target)``) and return it (in train mode).

    ``dataset_id`` identifies the data for resuming (e.g. the annotation file's hash; default: its size).
    Under torchrun each process takes a disjoint share of every global batch; gradients are averaged by
    DistributedDataParallel and only rank 0 writes ``work_dir/last.pt`` and ``log_csv``.
    """
    if len(dataset) == 0:
        raise VspaError("train_detector: the training dataset has no images. Check the split's annotations.json.")
    world_size = distributed.env_world_size()
    if cfg.batch_size % world_size:
        raise VspaError(
            f"params.yaml: batch_size {cfg.batch_size} is not divisible by the {world_size} processes. "
            f"Change batch_size or torchrun's --nproc_per_node."
        )
    ctx = distributed.setup(cfg.device)
    work_dir, log_csv = Path(work_dir), Path(log_csv)
    state_path = work_dir / "last.pt"
    detector.to(ctx.device).train()
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer, scheduler = sgd_with_schedule(params, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_factor)
    fingerprint = _fingerprint(cfg, detector, dataset_id or f"{len(dataset)} items")
    precision = Precision(cfg.amp, ctx.device)

    start, rows = 0, []
    # None when missing, foreign or unreadable (vspa.training.state): start from iteration 0
    state = state_file.load_state(state_path, STATE_FORMAT, fingerprint, "train")
    if state is not None:
        detector.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state.get("scaler"))
        start, rows = int(state["iteration"]), list(state["rows"])
        if ctx.is_main:
            print(f"[train] resuming from {state_path} at iteration {start}/{cfg.iterations}", file=sys.stderr)

    model = detector
    if ctx.enabled:
        model = DistributedDataParallel(detector, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    def save_state(iteration: int) -> None:
        if ctx.is_main:
            payload = {
                "model": {k: v.detach().cpu() for k, v in detector.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                **({"scaler": precision.state_dict()} if precision.enabled else {}),
                "rows": rows,
            }
            state_file.save_state(state_path, STATE_FORMAT, fingerprint, iteration, payload)
            write_log(log_csv, rows, CSV_COLUMNS)
        distributed.barrier(ctx)

    share = cfg.batch_size // ctx.world_size
    bar = tqdm(
        range(start, cfg.iterations),
        initial=start,
        total=cfg.iterations,
        desc="train",
        unit="it",
        disable=(None if progress else True) if ctx.is_main else True,
    )

    def make_batch(it: int) -> tuple[list, list]:
        """This process's share of iteration ``it``'s batch, on the CPU (a function of the seed and ``it`` only:
        it may be made ahead, in a data thread)."""
        indices = global_batch(len(dataset), cfg.batch_size, cfg.seed, it)
        images, targets = [], []
        for position in range(ctx.rank * share, (ctx.rank + 1) * share):
            image, target = dataset[indices[position]]
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, it, position, _AUG))
            image, target = _augment(image, target, g, cfg.strong_aug)
            images.append(image)
            targets.append({"boxes": target["boxes"], "labels": target["labels"]})
        return pinned((images, targets), pin)

    workers = default_workers(ctx.device)
    pin = workers > 0 and ctx.device.type == "cuda"  # pinned in the data thread, copied asynchronously
    prefetcher = Prefetcher(make_batch, range(start, cfg.iterations), workers)
    batches = iter(prefetcher)
    try:
        for it in bar:
            images, targets = to_device(next(batches), ctx.device)
            torch.manual_seed(derive_seed(cfg.seed, it, ctx.rank, _SAMPLER))
            lr = optimizer.param_groups[0]["lr"]

            with precision.autocast():
                losses = model(images, targets)
            total = sum(losses[k].float() for k in LOSS_NAMES)
            logged = distributed.all_reduce_mean(torch.stack([losses[k] for k in LOSS_NAMES] + [total]), ctx).cpu()
            values = logged.tolist()
            check_finite(
                dict(zip((*LOSS_NAMES, "total"), values)),
                it + 1,
                "training",
                f"Lower the learning rate (lr, now {cfg.lr:g}) or lengthen warmup_iters ({cfg.warmup_iters}).",
            )
            optimizer.zero_grad(set_to_none=True)
            precision.backward(total)
            precision.step(optimizer)
            scheduler.step()

            rows.append({"iteration": it + 1, "lr": lr, **dict(zip(LOSS_NAMES, values[:-1])), "total": values[-1]})
            bar.set_postfix(loss=f"{values[-1]:.3f}", lr=f"{lr:.2g}")
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                save_state(it + 1)
    finally:
        prefetcher.close()  # stops the data threads also when the loop ends in an error
    bar.close()
    if start >= cfg.iterations and ctx.is_main:
        write_log(log_csv, rows, CSV_COLUMNS)  # the run was complete: make sure the log is there
    distributed.barrier(ctx)
    return detector


def run_training_stage(
    params_path: str,
    section: str,
    data_dir: Path,
    out: Path,
    log_csv: Path,
    work_dir: Path,
    what: str,
) -> None:
    """Body of the ``pretrain`` / ``oracle`` stages: train a fresh detector on one labelled split.

    Reads ``model`` and ``<section>`` from ``params_path``; writes the checkpoint ``out`` (with the class
    names and the training config), the loss log ``log_csv`` and the resumable state in ``work_dir``.
    """
    from vspa.data.importers import require_pretrained

    params = stage_config(params_path, "model", section)
    model_cfg = DetectorConfig.from_params(params["model"], path=params_path)
    if not model_cfg.from_scratch:  # a real-data preset without its ImageNet weights stops here, before any work
        require_pretrained(params["model"], params["scenario"], path=params_path)
    train_cfg = TrainConfig.from_params(params[section], name=section, path=params_path)
    ann = Path(data_dir) / "annotations.json"
    data_hash = dataset_sha256(ann)
    dataset = DetectionDataset(ann, cache_mb=IMAGE_CACHE_MB)
    ctx = distributed.setup(train_cfg.device)
    if ctx.is_main:
        print(
            f"[{section}] {what}: {model_cfg.backbone} Faster R-CNN, {dataset.num_classes} classes "
            f"({', '.join(dataset.class_names)}), {len(dataset)} images from {data_dir}; {train_cfg.iterations} "
            f"iterations of batch {train_cfg.batch_size}, lr {train_cfg.lr:g} on {ctx.device}"
            + (f" x {ctx.world_size} processes" if ctx.enabled else "")
            + f" (scenario {params['scenario']}) -> {out}",
            file=sys.stderr,
        )
    seed_everything(train_cfg.seed)  # the detector's initial weights
    detector = build_detector(model_cfg, dataset.num_classes)
    train_detector(dataset, detector, train_cfg, work_dir, log_csv, dataset_id=data_hash)
    if ctx.is_main:
        extra = {
            "stage": section,
            "train": train_cfg.record(),
            "data": str(data_dir),
            "data_sha256": data_hash,
            "scenario": params["scenario"],
        }
        checkpoint.save(out, detector, model_cfg, dataset.class_names, extra=extra)
        print(f"[{section}] wrote {out} and {log_csv}", file=sys.stderr)
    distributed.cleanup(ctx)

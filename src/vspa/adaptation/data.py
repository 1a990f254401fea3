"""The inputs of an adaptation run (:class:`AdaptData`, the pair table of ``fg_mode: pairing``) and the
seeded source / target batches of each iteration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vspa.adaptation.pairing import PairTable
from vspa.training.seeds import derive_seed, global_batch
from vspa.utils import VspaError, sha256_file

if TYPE_CHECKING:  # config.py imports this module (PAIRING_FOLDERS, PAIRING_EXAMPLES)
    from vspa.adaptation.config import AdaptConfig

# random streams drawn from (seed, iteration, ...)
_SRC_ORDER, _TGT_ORDER, _SRC_AUG, _TGT_AUG, _SAMPLER, _ALIGN = 10, 11, 12, 13, 14, 15


PAIRING_FOLDERS = {
    "pairing_original": "the original source split (each object as it is; the split AugSim was made from)",
    "pairing_variants": "the folder holding the variant sets color/, flip/ and color_flip/ of that split",
}
PAIRING_EXAMPLES = {"pairing_original": "data/benchmark/source_train", "pairing_variants": "data/augsim/pairing"}


@dataclass
class AdaptData:
    """The inputs of an adaptation run."""

    source: Any  # DetectionDataset of the labelled source split (also the memory's source on refresh)
    target: Any  # DetectionDataset of the unlabelled target split (its labels are never read)
    memory_path: Path | None  # the (subsampled) memory file; None when no memory loss is on
    fingerprint: dict  # what identifies the inputs (hashes), for resuming
    pairing_table: PairTable | None = None  # fg_mode pairing: the target objects' counterparts (build_pairing_table)


def build_pairing_table(
    cfg: AdaptConfig, target_dir: str | Path, name: str = "adapt", path: str = "params.yaml"
) -> PairTable:
    """The pair table of ``fg_mode: pairing`` from ``cfg.pairing_original``, ``cfg.pairing_variants`` and the
    target split folder; a missing folder raises ``VspaError`` naming the param and the fix."""
    for key, what in PAIRING_FOLDERS.items():
        folder = Path(getattr(cfg, key))
        if not getattr(cfg, key) or not folder.is_dir():
            raise VspaError(
                f"{path}: {name}.{key} = '{getattr(cfg, key)}' is not a folder; it must name {what} "
                f"(e.g. {PAIRING_EXAMPLES[key]}). Run `dvc repro augsim` or fix the path."
            )
    return PairTable.build(cfg.pairing_original, cfg.pairing_variants, target_dir)


def pairing_fingerprint(table: PairTable) -> dict:
    """Hashes of the pairing sets' annotation files (part of the resume fingerprint in ``fg_mode: pairing``)."""
    return {variant: sha256_file(folder / "annotations.json") for variant, folder in sorted(table.split_dirs.items())}


def _views(dataset, indices: list[int], positions: range, seed: int, iteration: int, stream: int, device):
    """Weak views (and their targets) and strong views of the items of one process's share of a batch, and
    the weak views' pairing ground truth (``boxes``, ``object_ids``, ``flipped``; on the CPU, read only by
    ``fg_mode: pairing``)."""
    from vspa.data import transforms

    weak, strong, targets, pairs = [], [], [], []
    for position in positions:
        image, target = dataset[indices[position]]
        g = torch.Generator().manual_seed(derive_seed(seed, iteration, position, stream))
        image, target = transforms.weak(image, target, g)
        weak.append(image.to(device))
        strong.append(transforms.strong(image, g).to(device))
        targets.append({"boxes": target["boxes"].to(device), "labels": target["labels"].to(device)})
        pairs.append(
            {
                "boxes": target["boxes"],
                "labels": target["labels"],  # read only by the pseudo-label diagnostics, never by training
                "object_ids": target["object_ids"],
                "flipped": bool(target["flipped"]),
            }
        )
    return weak, strong, targets, pairs


def _batch(data: AdaptData, cfg: AdaptConfig, iteration: int, positions: range, device):
    """This process's share of iteration ``iteration``'s batches: source images (weak views, then the strong
    views when ``source_strong``) with their targets, the weak and strong target views, and the target weak
    views' pairing ground truth (boxes, object ids, mirror flag; used only by ``fg_mode: pairing``)."""
    src_idx = global_batch(len(data.source), cfg.batch_size, derive_seed(cfg.seed, _SRC_ORDER), iteration)
    tgt_idx = global_batch(len(data.target), cfg.batch_size, derive_seed(cfg.seed, _TGT_ORDER), iteration)
    src_weak, src_strong, src_targets, _ = _views(
        data.source, src_idx, positions, cfg.seed, iteration, _SRC_AUG, device
    )
    tgt_weak, tgt_strong, tgt_pairs = [], [], []
    if cfg.uses_target:  # the fair source-only baseline reads no target image
        tgt_weak, tgt_strong, _, tgt_pairs = _views(
            data.target, tgt_idx, positions, cfg.seed, iteration, _TGT_AUG, device
        )
    if cfg.source_strong:
        return src_weak + src_strong, src_targets + src_targets, tgt_weak, tgt_strong, tgt_pairs
    return src_weak, src_targets, tgt_weak, tgt_strong, tgt_pairs

"""Diagnostics of an adaptation run: does each alignment term act, and how good are the pseudo-labels?

Per iteration (cheap, every iteration; columns of ``diagnostics.csv``):

- ``img_disc_acc``, ``bg_disc_acc``: balanced accuracy of the image-level and background discriminators on
  the iteration's batch, before their update (0.5 = chance: the discriminator gives the detector no signal);
- ``fg_active``: share of foreground triplets with a positive hinge (the others give no gradient);
  ``cos_ap`` / ``cos_an``: mean cosine of anchor-positive and anchor-negative;
- ``pseudo_tp``, ``pseudo_n``, ``gt_n``: per target image, pseudo-labels that match a target-train ground-truth
  object (same class, IoU >= 0.5, each object matched once, highest score first), pseudo-labels kept, and
  ground-truth objects. **Diagnostic only**: the target labels are read here and written to the log, never
  passed to the training step, the memory or any choice of the pipeline (defaults are chosen on the
  target validation split).

Every ``diag_every`` iterations (``grad_shares.csv``): the L2 norm of the gradient that each weighted loss
term sends to the detector's parameters (the discriminators excluded), divided by the supervised term's:
``share_unsup``, ``share_img``, ``share_fg``, ``share_bg``. On those iterations the student's backward pass
is done term by term (one ``torch.autograd.grad`` per term, then the gradients summed into ``.grad``): the
same gradient as ``total.backward()`` up to float summation order, at the cost of traversing the shared parts
of the graph once per term. Under DistributedDataParallel the shares are not taken (NaN): DDP's gradient
reduction hooks into ``backward()``.

:func:`summarize_diagnostics` turns the rows into the run's ``diagnostics.json`` (DVC metrics): means over
the second half of training for the per-iteration values, over all samples for the shares.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import torch
from torchvision.ops import box_iou

TERMS = ("sup", "unsup", "img", "fg", "bg")
ITER_COLUMNS = (
    "iteration",
    "img_disc_acc",
    "bg_disc_acc",
    "fg_active",
    "cos_ap",
    "cos_an",
    "pseudo_per_image",
    "pseudo_tp",
    "pseudo_n",
    "gt_n",
)
SHARE_COLUMNS = ("iteration", "grad_sup", "share_unsup", "share_img", "share_fg", "share_bg", "time_backward")


@torch.no_grad()
def pseudo_label_counts(pseudo: list[dict], truth: list[dict], iou: float = 0.5) -> tuple[float, float, float]:
    """``(true positives, pseudo-labels, ground-truth objects)`` summed over the images: a pseudo-label is a
    true positive when it overlaps a not yet matched ground-truth box of its class with IoU >= ``iou``
    (pseudo-labels taken by descending score). Diagnostic only (see the module docstring)."""
    tp = n_pseudo = n_gt = 0
    for det, gt in zip(pseudo, truth):
        boxes, labels = det["boxes"].detach().cpu(), det["labels"].detach().cpu()
        gt_boxes, gt_labels = gt["boxes"].cpu(), gt["labels"].cpu()
        n_pseudo += len(boxes)
        n_gt += len(gt_boxes)
        if len(boxes) == 0 or len(gt_boxes) == 0:
            continue
        order = torch.argsort(det["scores"].detach().cpu(), descending=True) if "scores" in det else range(len(boxes))
        ious = box_iou(boxes.float(), gt_boxes.float())
        taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
        for i in order:
            i = int(i)
            cand = (gt_labels == labels[i]) & ~taken & (ious[i] >= iou)
            if cand.any():
                j = int(torch.argmax(torch.where(cand, ious[i], torch.tensor(-1.0))))
                taken[j] = True
                tp += 1
    return float(tp), float(n_pseudo), float(n_gt)


def term_gradients(terms: dict[str, torch.Tensor], params: list[torch.nn.Parameter], detector_ids: set[int]) -> dict:
    """Backward pass term by term: ``.grad`` of ``params`` set to the sum of every term's gradient (what
    ``sum(terms).backward()`` gives, up to summation order) and ``{term: L2 norm of its gradient on the
    detector's parameters}`` returned. ``params`` must have no gradient yet (``zero_grad(set_to_none=True)``)."""
    names = [k for k, v in terms.items() if v.requires_grad]
    norms = {k: 0.0 for k in terms}
    for n, name in enumerate(names):
        grads = torch.autograd.grad(terms[name], params, retain_graph=n < len(names) - 1, allow_unused=True)
        squared = 0.0
        for p, g in zip(params, grads):
            if g is None:
                continue
            if id(p) in detector_ids:
                squared += float(g.detach().float().pow(2).sum())
            p.grad = g if p.grad is None else p.grad + g
        norms[name] = math.sqrt(squared)
    return norms


def shares(norms: dict[str, float]) -> dict[str, float]:
    """Each term's gradient norm relative to the supervised term's (NaN if that is 0)."""
    sup = norms.get("sup", 0.0)
    out = {"grad_sup": sup}
    for term in TERMS[1:]:
        out[f"share_{term}"] = norms.get(term, 0.0) / sup if sup > 0 else float("nan")
    return out


def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def iteration_csv_text(rows: list[dict]) -> str:
    """``diagnostics.csv``: one line per iteration (empty cell = not defined, e.g. no triplet that iteration)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ITER_COLUMNS)
    for row in rows:
        writer.writerow([int(row["iteration"])] + [_fmt(row.get(k)) for k in ITER_COLUMNS[1:]])
    return buf.getvalue()


def shares_csv_text(rows: list[dict]) -> str:
    """``grad_shares.csv``: the iterations where the gradient shares were sampled."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SHARE_COLUMNS)
    for row in rows:
        if not math.isnan(row.get("grad_sup", float("nan"))):
            writer.writerow([int(row["iteration"])] + [_fmt(row.get(k)) for k in SHARE_COLUMNS[1:]])
    return buf.getvalue()


def _nanmean(values) -> float | None:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)]
    return round(float(arr.mean()), 4) if arr.size else None


def summarize_diagnostics(rows: list[dict]) -> dict:
    """The run's diagnostics: per-iteration values averaged over the second half of the iterations (the
    first half is warm-up for the discriminators and the teacher), gradient shares over every sample,
    pseudo-label precision / recall over the whole run and over the second half."""
    if not rows:
        return {}
    half = rows[len(rows) // 2 :]

    def prec_rec(part):
        tp = sum(r.get("pseudo_tp", 0.0) for r in part)
        n_pseudo = sum(r.get("pseudo_n", 0.0) for r in part)
        n_gt = sum(r.get("gt_n", 0.0) for r in part)
        return (round(tp / n_pseudo, 4) if n_pseudo else None, round(tp / n_gt, 4) if n_gt else None)

    sampled = [r for r in rows if not math.isnan(r.get("grad_sup", float("nan")))]
    plain = [r for r in rows if math.isnan(r.get("grad_sup", float("nan"))) and "time_backward" in r]
    total_time = sum(r.get("time_iter", 0.0) for r in rows)
    overhead = None  # extra backward time of the sampled iterations, as a share of the run's time
    if sampled and plain and total_time > 0:
        extra = np.mean([r["time_backward"] for r in sampled]) - np.mean([r["time_backward"] for r in plain])
        overhead = round(float(extra * len(sampled) / total_time), 4)
    precision, recall = prec_rec(rows)
    precision_2, recall_2 = prec_rec(half)
    out = {
        "second_half": {
            "img_disc_acc": _nanmean(r.get("img_disc_acc") for r in half),
            "bg_disc_acc": _nanmean(r.get("bg_disc_acc") for r in half),
            # the background discriminator's own loss; 2 ln 2 = 1.386: at chance (None without a bg term)
            "loss_bg": _nanmean(r.get("loss_bg") for r in half if not math.isnan(r.get("bg_disc_acc", float("nan")))),
            "fg_active": _nanmean(r.get("fg_active") for r in half),
            "cos_ap": _nanmean(r.get("cos_ap") for r in half),
            "cos_an": _nanmean(r.get("cos_an") for r in half),
            "pseudo_per_image": _nanmean(r.get("pseudo_per_image") for r in half),
            "pseudo_precision": precision_2,
            "pseudo_recall": recall_2,
        },
        "whole_run": {
            "bg_disc_acc": _nanmean(r.get("bg_disc_acc") for r in rows),
            "fg_active": _nanmean(r.get("fg_active") for r in rows),
            "pseudo_precision": precision,
            "pseudo_recall": recall,
        },
        "grad_share": {f"{term}": _nanmean(r.get(f"share_{term}") for r in sampled) for term in TERMS[1:]},
        "grad_samples": len(sampled),
        "grad_share_overhead": overhead,
    }
    return out

"""Per-run diagnostics of the translator (issue 17): do the attention masks split and find the objects, and
does the local-global loss tell views of one image from views of another?

Measured on the first :data:`DIAG_IMAGES` images of the target training split (with their annotated boxes),
at initialisation and after training, and written by ``translate_train`` to
``reports/translate/<variant>_diagnostics.json`` (dvc metrics):

- ``mask_entropy``: the mean over pixels of the entropy (nats) of the ``n + 1`` masks at a pixel, of at most
  ``mask_entropy_max = ln(n + 1)`` (every mask equal); low means each pixel is given to few masks;
- ``usage_entropy``: the entropy of the masks' mean shares over the images (high: every mask is used);
  ``fg_usage_min`` / ``fg_usage_max``: the smallest and largest share of a foreground mask; ``bg_mean``: the
  background mask's share (the part of the output copied from the input);
- ``bg_on_objects`` / ``bg_off_objects``: the mean background mask inside / outside the annotated boxes
  (equal: the copy does not depend on what is where); ``fg_object_gap_max``: the largest difference, over the
  foreground masks, between a mask's mean inside and outside the boxes (> 0: some mask prefers objects);
  ``object_share``: the part of the pixels inside boxes; the box entries are ``null`` when the split has none;
- variant ``attention_lg`` only, from two augmented views of each image (centre crops of the training size):
  ``lg_same`` / ``lg_diff``: the mean cosine similarity of the online and momentum global embeddings for two
  views of one image / of two different images, averaged over the 4 layers; ``lg_gap`` = their difference;
  ``lg_top1``: how often an online embedding's most similar momentum embedding is its own image's. Before
  any training step (``init``) the loss has no feature statistics yet: these views' own standardise them.

At initialisation (after L_GA's queue and statistics are primed) also the gradient norms of PatchNCE and of
L_GA (at its full weight ``lambda_ga``) on E and on G_A for the first batch (:func:`gradient_norms`): L_GA
should not swamp PatchNCE on the encoder they share.

The variant ``cut`` has no masks and no L_GA: it reports only ``grad_encoder_nce``.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch

from vspa.translation.grid import pad_to_multiple
from vspa.translation.local_global import two_views

DIAG_IMAGES = 16


def box_mask(annotations: list[dict], height: int, width: int) -> torch.Tensor:
    """``[H, W]`` bool: the pixels inside any of the annotations' boxes (COCO ``[x, y, w, h]``)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
        x1, y1 = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = True
    return mask


class DiagnosticImages:
    """The first ``count`` images of a split (``[3, H, W]`` in [-1, 1]) and the masks of their boxes."""

    def __init__(
        self, split_dir: str | os.PathLike, crop: tuple[int, int] | None, multiple: int, count: int = DIAG_IMAGES
    ):
        from vspa.data.coco import load_coco
        from vspa.translation.data import read_image

        data = load_coco(Path(split_dir) / "annotations.json")
        self.crop, self.multiple = crop, multiple
        self.images, self.objects = [], []
        for record in data.images[:count]:
            image = read_image(data.image_path(record))
            self.images.append(image)
            self.objects.append(box_mask(data.annotations_by_image.get(record["id"], []), *image.shape[-2:]))
        self.has_boxes = any(bool(m.any()) for m in self.objects)

    def __len__(self) -> int:
        return len(self.images)

    def view_sources(self) -> torch.Tensor | None:
        """Centre crops of the training size (whole images cut to multiples of ``multiple`` without crops)
        as one batch; None when the images are too small or differ in size."""
        crops = []
        for image in self.images:
            h, w = image.shape[-2:]
            ch, cw = self.crop if self.crop is not None else (h - h % self.multiple, w - w % self.multiple)
            if ch < self.multiple or cw < self.multiple or h < ch or w < cw:
                return None
            top, left = (h - ch) // 2, (w - cw) // 2
            crops.append(image[:, top : top + ch, left : left + cw])
        if not crops or len({tuple(c.shape) for c in crops}) > 1:
            return None
        return torch.stack(crops)


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


@torch.no_grad()
def attention_stats(generator, images: DiagnosticImages, device) -> dict:
    """The mask entries of the module doc for an attention translator."""
    was_training = generator.training
    generator.eval()
    entropy_sum, pixels, on_pixels = 0.0, 0, 0
    share = share_on = None
    try:
        for image, objects in zip(images.images, images.objects):
            h, w = image.shape[-2:]
            masks = generator.translate(pad_to_multiple(image[None].to(device))).masks[0, :, :h, :w].double().cpu()
            entropy_sum += float(-(masks * masks.clamp_min(1e-12).log()).sum(dim=0).sum())
            pixels += h * w
            on_pixels += int(objects.sum())
            totals, on = masks.sum(dim=(1, 2)), masks[:, objects].sum(dim=1)
            share = totals if share is None else share + totals
            share_on = on if share_on is None else share_on + on
    finally:
        generator.train(was_training)
    n_masks = share.shape[0]
    usage = share / pixels
    out = {
        "mask_entropy": _round(entropy_sum / pixels),
        "mask_entropy_max": _round(math.log(n_masks)),
        "usage_entropy": _round(-(usage * usage.clamp_min(1e-12).log()).sum()),
        "fg_usage_min": _round(usage[:-1].min()),
        "fg_usage_max": _round(usage[:-1].max()),
        "bg_mean": _round(usage[-1]),
        "bg_on_objects": None,
        "bg_off_objects": None,
        "fg_object_gap_max": None,
        "object_share": None,
    }
    if on_pixels and pixels - on_pixels:
        mean_on = share_on / on_pixels
        mean_off = (share - share_on) / (pixels - on_pixels)
        out.update(
            {
                "bg_on_objects": _round(mean_on[-1]),
                "bg_off_objects": _round(mean_off[-1]),
                "fg_object_gap_max": _round((mean_on[:-1] - mean_off[:-1]).max()),
                "object_share": _round(on_pixels / pixels),
            }
        )
    return out


@torch.no_grad()
def lg_separation(local_global, generator, views_of: torch.Tensor, seed: int, device) -> dict:
    """The ``lg_*`` entries of the module doc: views of ``views_of`` ``[N, 3, H, W]`` drawn with ``seed``."""
    n = views_of.shape[0]
    if n < 2:
        return {}
    v1, v2 = two_views(views_of.to(device), torch.Generator().manual_seed(seed))
    if int(local_global.whole_stats[0].updates) == 0:  # not trained yet: standardise by these views' statistics
        local_global = copy.deepcopy(local_global)
        for view, encoder, attention in (
            (v1, generator.encoder, generator.attention),
            (v2, local_global.momentum_encoder, local_global.momentum_attention),
        ):
            whole, parts = local_global.pooled(encoder, attention, view)
            for stats, f in [*zip(local_global.whole_stats, whole), *zip(local_global.patch_stats, parts)]:
                stats.update(f)
    q, _ = local_global.embed(generator, v1)
    k, _ = local_global.embed(generator, v2, momentum=True)
    eye = torch.eye(n, dtype=torch.bool, device=q[0].device)
    same, diff, top1 = [], [], []
    for qi, ki in zip(q, k):
        sim = qi @ ki.t()
        same.append(float(sim[eye].mean()))
        diff.append(float(sim[~eye].mean()))
        top1.append(float((sim.argmax(dim=1) == torch.arange(n, device=sim.device)).float().mean()))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        "lg_same": _round(mean(same)),
        "lg_diff": _round(mean(diff)),
        "lg_gap": _round(mean(same) - mean(diff)),
        "lg_top1": _round(mean(top1)),
    }


def _norm(module) -> float:
    return math.sqrt(sum(float(p.grad.detach().pow(2).sum()) for p in module.parameters() if p.grad is not None))


def gradient_norms(
    models,
    real_a: torch.Tensor,
    real_b: torch.Tensor,
    lambda_nce: float,
    lambda_ga: float,
    views_rng: torch.Generator | None = None,
) -> dict:
    """The L2 norms of the gradients of ``lambda_nce * 0.5 [NCE(a, G(a)) + NCE(b, G(b))]`` and (with L_GA)
    ``lambda_ga * L_GA(a)`` on E's and G_A's parameters, each alone, computed on a copy of ``models`` (nothing
    changes): ``grad_encoder_nce``, ``grad_encoder_ga``, ``grad_attention_nce``, ``grad_attention_ga``."""
    models = copy.deepcopy(models)
    g = models.generator
    n = real_a.shape[0]
    out = {}
    fake = g(torch.cat([real_a, real_b]))
    nce = lambda_nce * 0.5 * (models.nce(g.encoder, real_a, fake[:n]) + models.nce(g.encoder, real_b, fake[n:]))
    nce.backward()
    out["grad_encoder_nce"] = _round(_norm(g.encoder))
    if g.cfg.attention:
        out["grad_attention_nce"] = _round(_norm(g.attention))
    if models.local_global is not None:
        models.zero_grad(set_to_none=True)
        loss, _ = models.local_global(g, real_a, views_rng)
        (lambda_ga * loss).backward()
        out["grad_encoder_ga"] = _round(_norm(g.encoder))
        out["grad_attention_ga"] = _round(_norm(g.attention))
    return out


def run_diagnostics(models, images: DiagnosticImages, seed: int, device) -> dict:
    """Every entry of the module doc that applies to ``models`` (a ``TranslationModels``); changes nothing."""
    generator = models.generator
    if not generator.cfg.attention:
        return {}
    out = attention_stats(generator, images, device)
    views_of = images.view_sources()
    if models.local_global is not None and views_of is not None:
        out.update(lg_separation(models.local_global, generator, views_of, seed, device))
    return out

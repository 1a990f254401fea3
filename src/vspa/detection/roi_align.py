"""ROIAlign with a fast CPU backward pass.

torchvision's CPU ``roi_align`` backward walks every ROI, channel, bin and sampling point in one thread and
scatters four bilinear weights per point; on the embedded benchmark it was the most expensive single operator
of a training iteration (about a fifth of a pretrain iteration on the 2-core CPU, more than all the
backbone's convolutions' backward; reports/bench/iteration.md). Here the forward pass is torchvision's own
(identical numbers, so evaluation and the teacher are unchanged) and the backward pass is one sparse matrix
product: the gradient of the feature map is ``A^T @ G``, where ``A`` holds, for each output bin, the bilinear
weights of its sampling points on the feature map (torchvision's rule: ``aligned=False``, points more than one
cell outside the map weigh 0, points in the last row / column clamp to it) and ``G`` the bins' gradients.
Same gradient up to float summation order (checked against torchvision's in tests/test_roi_align.py).

Only the CPU with a fixed ``sampling_ratio`` and one feature level takes this path; bfloat16 / float16 features
(mixed precision, ``amp: true``) are pooled in float32 and the result cast back, as torchvision's autocast rule
does. CUDA (whose torchvision kernel is fast) and multi-level pooling use torchvision unchanged.
"""

from __future__ import annotations

import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def sampling_matrix(
    rois: torch.Tensor, height: int, width: int, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bilinear weights of ``roi_align(aligned=False)``: ``(rows, cols, weights)`` of a sparse matrix.

    ``rows`` index the flattened feature map ``b * height * width + y * width + x``, ``cols`` the flattened
    output bin ``k * out_h * out_w + ph * out_w + pw``; ``weights`` include the ``1 / sampling_ratio**2`` mean.
    Entries are ordered by (k, ph, pw, iy, ix, corner), torchvision's loop order.
    """
    out_h, out_w = output_size
    sr = sampling_ratio
    num = rois.shape[0]
    dtype, device = rois.dtype, rois.device
    x1, y1 = rois[:, 1] * spatial_scale, rois[:, 2] * spatial_scale
    roi_w = torch.clamp(rois[:, 3] * spatial_scale - x1, min=1.0)
    roi_h = torch.clamp(rois[:, 4] * spatial_scale - y1, min=1.0)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    offset = torch.arange(sr, device=device, dtype=dtype) + 0.5
    ph = torch.arange(out_h, device=device, dtype=dtype)
    pw = torch.arange(out_w, device=device, dtype=dtype)
    # y[k, ph, iy] = y1 + ph * bin_h + (iy + 0.5) * bin_h / sr, and x likewise (torchvision's expression order)
    y = y1[:, None, None] + ph[None, :, None] * bin_h[:, None, None] + offset[None, None, :] * bin_h[:, None, None] / sr
    x = x1[:, None, None] + pw[None, :, None] * bin_w[:, None, None] + offset[None, None, :] * bin_w[:, None, None] / sr
    y = y[:, :, None, :, None].expand(num, out_h, out_w, sr, sr).reshape(num, -1)
    x = x[:, None, :, None, :].expand(num, out_h, out_w, sr, sr).reshape(num, -1)
    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y, x = y.clamp(min=0), x.clamp(min=0)
    y_low, x_low = y.floor().long(), x.floor().long()
    y_last, x_last = y_low >= height - 1, x_low >= width - 1
    y_low = torch.where(y_last, torch.full_like(y_low, height - 1), y_low)
    x_low = torch.where(x_last, torch.full_like(x_low, width - 1), x_low)
    y_high = torch.where(y_last, y_low, y_low + 1)
    x_high = torch.where(x_last, x_low, x_low + 1)
    y = torch.where(y_last, y_low.to(dtype), y)
    x = torch.where(x_last, x_low.to(dtype), x)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], -1) * inside[..., None] / (sr * sr)
    plane = (rois[:, 0].long() * (height * width))[:, None, None]
    rows = plane + torch.stack(
        [y_low * width + x_low, y_low * width + x_high, y_high * width + x_low, y_high * width + x_high], -1
    )
    bins = out_h * out_w
    cols = torch.arange(num * bins, device=device).repeat_interleave(sr * sr * 4)
    return rows.reshape(-1), cols, weights.reshape(-1)


class _RoIAlignSparseBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio):
        ctx.save_for_backward(rois)
        ctx.meta = (features.shape, output_size, spatial_scale, sampling_ratio)
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False)

    @staticmethod
    def backward(ctx, grad_out):
        (rois,) = ctx.saved_tensors
        (batch, channels, height, width), output_size, spatial_scale, sampling_ratio = ctx.meta
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        num, bins = rois.shape[0], output_size[0] * output_size[1]
        if num == 0:
            return grad_out.new_zeros((batch, channels, height, width)), None, None, None, None
        rows, cols, weights = sampling_matrix(rois.detach(), height, width, output_size, spatial_scale, sampling_ratio)
        matrix = torch.sparse_coo_tensor(
            torch.stack([rows, cols]),
            weights.to(grad_out.dtype),
            (batch * height * width, num * bins),
            check_invariants=False,
        )
        per_bin = grad_out.reshape(num, channels, bins).transpose(1, 2).reshape(num * bins, channels)
        grad = torch.sparse.mm(matrix, per_bin)  # [B*H*W, C]
        # an NCHW-shaped view of the NHWC result: channels-last strides, which the small backbone's map has
        return grad.reshape(batch, height, width, channels).permute(0, 3, 1, 2), None, None, None, None


def roi_align_fast_backward(
    features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int
) -> torch.Tensor:
    """``torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False)``
    (``rois``: ``[K, 5]`` with the batch index first) with the sparse backward where it applies."""
    fast = (
        features.device.type == "cpu"
        and features.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and sampling_ratio > 0
        and torch.is_grad_enabled()
        and features.requires_grad
    )
    if not fast:
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False)
    if features.dtype in (torch.bfloat16, torch.float16):
        # mixed precision (bfloat16 autocast on the CPU): what torchvision's autocast rule does, computing in
        # float32 and returning the input's dtype, but with the sparse backward (torchvision's is ~3x slower)
        with torch.autocast("cpu", enabled=False):
            out = _RoIAlignSparseBackward.apply(
                features.float(), rois.float(), tuple(output_size), spatial_scale, sampling_ratio
            )
        return out.to(features.dtype)
    return _RoIAlignSparseBackward.apply(
        features, rois.to(features.dtype), tuple(output_size), spatial_scale, sampling_ratio
    )


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` whose single-level CPU path uses :func:`roi_align_fast_backward`."""

    def forward(self, x, boxes, image_shapes):
        x_filtered = _filter_input(x, self.featmap_names)
        if len(x_filtered) != 1:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                x_filtered, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        return roi_align_fast_backward(
            x_filtered[0], rois, tuple(self.output_size), self.scales[0], self.sampling_ratio
        )

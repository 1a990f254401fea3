"""The sparse ROIAlign backward (vspa.detection.roi_align) against torchvision's own CPU kernel."""

import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from vspa.detection.roi_align import FastMultiScaleRoIAlign, roi_align_fast_backward, sampling_matrix


def _case(dtype=torch.float32, batch=3, channels=5, height=11, width=17, num=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, height, width, generator=g, dtype=dtype)
    scale = 0.25
    img_h, img_w = height / scale, width / scale
    index = torch.randint(0, batch, (num,), generator=g).to(dtype)
    xy = torch.rand(num, 2, generator=g, dtype=dtype) * torch.tensor([img_w, img_h], dtype=dtype) - 6
    wh = torch.rand(num, 2, generator=g, dtype=dtype) * 30 + 0.2
    rois = torch.cat([index[:, None], xy, xy + wh], 1)
    # edge cases: wholly outside (weights 0), on the last row / column (clamped), smaller than a cell, the full map
    rois[0, 1:] = torch.tensor([-40.0, -40.0, -9.0, -9.0])
    rois[1, 1:] = torch.tensor([img_w - 6, img_h - 3, img_w + 10, img_h + 5])
    rois[2, 1:] = torch.tensor([10.0, 10.0, 10.5, 10.2])
    rois[3, 1:] = torch.tensor([0.0, 0.0, img_w, img_h])
    return features, rois, scale


def _grads(fn, features, rois, scale, upstream):
    features = features.detach().requires_grad_(True)
    out = fn(features, rois, (7, 7), scale, 2)
    (grad,) = torch.autograd.grad(out, features, upstream)
    return out.detach(), grad


def test_forward_is_torchvisions_and_backward_matches_it():
    features, rois, scale = _case()
    upstream = torch.randn(rois.shape[0], features.shape[1], 7, 7, generator=torch.Generator().manual_seed(1))
    out_ref, grad_ref = _grads(lambda f, r, o, s, n: roi_align(f, r, o, s, n), features, rois, scale, upstream)
    out, grad = _grads(roi_align_fast_backward, features, rois, scale, upstream)
    assert torch.equal(out, out_ref)
    assert grad_ref.abs().max() > 0.5  # the case does reach the map
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)
    # the ROI wholly outside the map sends no gradient: its upstream alone gives a zero map
    only_outside = torch.zeros_like(upstream)
    only_outside[0] = 1.0
    _, grad_outside = _grads(roi_align_fast_backward, features, rois, scale, only_outside)
    assert torch.count_nonzero(grad_outside) == 0


def test_backward_is_the_exact_gradient_in_float64():
    features, rois, scale = _case(dtype=torch.float64, batch=2, channels=2, height=6, width=7, num=6)
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: roi_align_fast_backward(f, rois, (3, 3), scale, 2), (features,))


def test_sampling_matrix_on_a_hand_computed_case():
    # one ROI covering feature cells [0, 2) x [0, 2) of a 4x4 map at scale 1, one bin, 1 sampling point:
    # the point is the ROI centre (1.0, 1.0) -> all weight on cell (1, 1)
    rois = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]])
    rows, cols, weights = sampling_matrix(rois, 4, 4, (1, 1), 1.0, 1)
    dense = torch.zeros(16).index_add_(0, rows, weights)
    expected = torch.zeros(16)
    expected[1 * 4 + 1] = 1.0
    assert torch.equal(dense, expected)
    assert torch.equal(cols, torch.zeros(4, dtype=torch.long))
    # shifted by half a cell: (1.5, 1.0) -> cells (1, 1) and (1, 2), half each
    rows, _, weights = sampling_matrix(torch.tensor([[0.0, 0.5, 0.0, 2.5, 2.0]]), 4, 4, (1, 1), 1.0, 1)
    dense = torch.zeros(16).index_add_(0, rows, weights)
    assert dense[1 * 4 + 1] == 0.5 and dense[1 * 4 + 2] == 0.5 and dense.sum() == 1.0


def test_backward_is_deterministic_and_handles_no_rois():
    features, rois, scale = _case(num=60)
    upstream = torch.randn(60, features.shape[1], 7, 7)
    _, first = _grads(roi_align_fast_backward, features, rois, scale, upstream)
    _, second = _grads(roi_align_fast_backward, features, rois, scale, upstream)
    assert torch.equal(first, second)
    _, none = _grads(roi_align_fast_backward, features, rois[:0], scale, upstream[:0])
    assert none.shape == features.shape and torch.count_nonzero(none) == 0


def test_pooler_matches_torchvisions_pooler():
    features, _, _ = _case(batch=2, height=10, width=20)
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 20.0], [12.0, 4.0, 70.0, 38.0]]), torch.tensor([[5.0, 5.0, 9.0, 40.0]])]
    shapes = [(40, 80), (40, 80)]
    fast, ref = FastMultiScaleRoIAlign(["0"], 7, 2), MultiScaleRoIAlign(["0"], 7, 2)
    f1 = features.clone().requires_grad_(True)
    f2 = features.clone().requires_grad_(True)
    out_fast, out_ref = fast({"0": f1}, boxes, shapes), ref({"0": f2}, boxes, shapes)
    assert torch.equal(out_fast, out_ref)
    (out_fast * out_fast).sum().backward()
    (out_ref * out_ref).sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference takes torchvision's path unchanged
        assert torch.equal(fast({"0": features}, boxes, shapes), ref({"0": features}, boxes, shapes))


def test_bfloat16_features_under_autocast_take_the_sparse_backward():
    """Mixed precision on the CPU (``amp: true``): bfloat16 features are pooled in float32 as torchvision's
    autocast rule does (same output, bfloat16 again) and the gradient is the sparse one, not torchvision's."""
    features, rois, scale = _case()
    features = features.to(torch.bfloat16)
    upstream = torch.randn(rois.shape[0], features.shape[1], 7, 7, generator=torch.Generator().manual_seed(2))
    leaf_ref = features.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref = roi_align(leaf_ref, rois, (7, 7), scale, 2)
    (grad_ref,) = torch.autograd.grad(out_ref, leaf_ref, upstream.to(out_ref.dtype))
    leaf = features.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align_fast_backward(leaf, rois, (7, 7), scale, 2)
    assert out.dtype == out_ref.dtype == torch.bfloat16
    assert torch.equal(out, out_ref)
    assert out.grad_fn is not None and "RoIAlignSparse" in repr(out.grad_fn.next_functions)
    (grad,) = torch.autograd.grad(out, leaf, upstream.to(out.dtype))
    assert grad.dtype == torch.bfloat16 and grad_ref.abs().max() > 0.5
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=2e-2, atol=2e-2)

"""Mixed precision (vspa.training.precision): the code path runs on the CPU (bfloat16 autocast + GradScaler),
keeps its scaler in the resumable state, and changes nothing when off."""

from __future__ import annotations

import torch

from test_train import DiesAfter, Killed, TinyDataset, fresh_detector, read_csv, train_cfg
from vspa.detection.train import train_detector
from vspa.training.precision import Precision


def test_disabled_precision_is_the_plain_fp32_step():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([w], lr=0.1)
    p = Precision(False, "cpu")
    with p.autocast():
        loss = (w * torch.ones(3)).sum()
    assert loss.dtype == torch.float32 and p.scale(loss) is loss and p.state_dict() == {}
    before = w.detach().clone()
    p.backward(loss)
    p.step(opt)
    assert torch.allclose(w.detach(), before - 0.1)


def test_enabled_precision_autocasts_scales_and_skips_a_non_finite_step():
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = torch.optim.SGD([w], lr=0.1)
    p = Precision(True, "cpu")
    with p.autocast():
        y = torch.ones(2, 4) @ w
    assert y.dtype == torch.bfloat16  # CPU autocast: bfloat16 (float16 on CUDA)
    loss = y.float().sum()
    assert float(p.scale(loss).detach()) == float(loss.detach()) * p.state_dict()["scale"]
    p.backward(loss)
    p.step(opt)  # finite: unscaled gradient (2 per entry) applied
    assert torch.allclose(w.detach(), torch.full((4, 4), 1 - 0.1 * 2))
    scale = p.state_dict()["scale"]
    opt.zero_grad()
    (w.sum() * float("inf")).backward()
    p.step(opt)  # not finite: step skipped, scale backed off
    assert torch.allclose(w.detach(), torch.full((4, 4), 0.8)) and p.state_dict()["scale"] < scale


def test_pretrain_with_amp_runs_resumes_and_records_it(tmp_path):
    cfg = train_cfg(amp=True)
    assert cfg.record()["amp"] is True and "amp" not in train_cfg().record()
    full = train_detector(TinyDataset(), fresh_detector(), cfg, tmp_path / "a", tmp_path / "a.csv", progress=False)
    rows = read_csv(tmp_path / "a.csv")
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(float(r["total"]))) for r in rows)
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0
    init = fresh_detector().state_dict()
    assert any(not torch.equal(init[k], v) for k, v in full.state_dict().items())
    try:  # killed after the checkpoint of iteration 3, resumed: the same weights as the uninterrupted run
        train_detector(DiesAfter(calls=8), fresh_detector(), cfg, tmp_path / "b", tmp_path / "b.csv", progress=False)
    except Killed:
        pass
    resumed = train_detector(TinyDataset(), fresh_detector(), cfg, tmp_path / "b", tmp_path / "b.csv", progress=False)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # and mixed precision really changed the arithmetic
    fp32 = train_detector(
        TinyDataset(), fresh_detector(), train_cfg(), tmp_path / "c", tmp_path / "c.csv", progress=False
    )
    assert any(not torch.equal(a, b) for a, b in zip(full.state_dict().values(), fp32.state_dict().values()))


def test_group_norm_fp32_is_group_norm_and_stays_float32_under_autocast():
    from vspa.detection.backbones import GroupNormFP32

    torch.manual_seed(0)
    plain, ours = torch.nn.GroupNorm(2, 4), GroupNormFP32(2, 4)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5), plain.bias.uniform_(-1, 1)
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 5, 6)
    assert torch.equal(ours(x), plain(x))  # without autocast: nn.GroupNorm exactly
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = plain(x.bfloat16())
        kept = ours(x.bfloat16())
    assert low.dtype == torch.bfloat16 and kept.dtype == torch.float32
    torch.testing.assert_close(kept, plain(x.bfloat16().float()))


def test_box_deltas_and_logits_stay_float32_under_autocast():
    """amp: the backbone and box head run in bfloat16, but the RPN head's and box predictor's outputs (box
    deltas, logits) are float32, so proposals, pseudo-labels and detections are not rounded to 8 bits."""
    det = fresh_detector().eval()
    seen = {}
    for name in (
        "rpn.head.cls_logits",
        "rpn.head.bbox_pred",
        "roi_heads.box_predictor.bbox_pred",
        "roi_heads.box_head",
    ):
        det.model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: o.dtype}))
    names = set(det.state_dict())
    assert {"model.rpn.head.cls_logits.weight", "model.roi_heads.box_predictor.bbox_pred.weight"} <= names
    image = torch.rand(3, 40, 60)
    with torch.no_grad():
        ref = det([image])[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = det([image])[0]
    assert seen == {
        "rpn.head.cls_logits": torch.float32,
        "rpn.head.bbox_pred": torch.float32,
        "roi_heads.box_predictor.bbox_pred": torch.float32,
        "roi_heads.box_head": torch.bfloat16,
    }
    assert out["boxes"].dtype == torch.float32 and ref["boxes"].dtype == torch.float32
    # boxes decoded in bfloat16 would all lie on bfloat16's grid (8 significant bits); float32 ones do not
    boxes = out["boxes"]
    assert len(boxes) > 0 and (boxes != boxes.bfloat16().float()).any()

"""The detector: composable steps, background pooling, losses, gradients, checkpoints, backbones."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from conftest import TINY_DETECTOR, default_section, detector_config

from vspa.detection import checkpoint
from vspa.detection.backbones import DEFAULT_ANCHOR_SIZES
from vspa.detection.model import LOSS_NAMES, DetectorConfig, build_detector
from vspa.utils import VspaError

TINY = TINY_DETECTOR


def tiny_detector(num_classes: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(detector_config(**TINY), num_classes)


def tiny_batch():
    """Two 64x128 images with bright rectangles on dark noise and their boxes."""
    g = torch.Generator().manual_seed(1)
    images, targets = [], []
    for boxes, labels in (([[10, 8, 40, 50], [70, 20, 110, 44]], [1, 2]), ([[50, 10, 90, 60]], [2])):
        image = 0.2 * torch.rand(3, 64, 128, generator=g)
        for (x1, y1, x2, y2), label in zip(boxes, labels):
            image[label - 1, y1:y2, x1:x2] = 0.9
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def test_config_from_params_fills_defaults_and_rejects_unknown_keys():
    conf = {k: default_section("model")[k] for k in ("backbone", "pretrained_weights", "from_scratch", "max_size")}
    section = {**conf, "min_size": 96, "box_batch_size_per_image": 64}  # the keys conf always states
    cfg = DetectorConfig.from_params(section)
    assert (cfg.min_size, cfg.max_size, cfg.small_width) == (96, 320, DetectorConfig.small_width)
    assert cfg.effective_anchor_sizes() == DEFAULT_ANCHOR_SIZES["small"]
    assert DetectorConfig.from_params({**section, "anchor_sizes": [8, 24]}).effective_anchor_sizes() == (8, 24)
    with pytest.raises(VspaError, match=r"model\.max_size is not set"):  # conf states it: no code default
        DetectorConfig.from_params({**section, "max_size": None})
    with pytest.raises(VspaError, match="unknown key.*anchors"):
        DetectorConfig.from_params({**section, "anchors": [8]})
    with pytest.raises(VspaError, match="model.backbone 'resnet18'"):
        DetectorConfig.from_params({**section, "backbone": "resnet18"})


def test_pool_embed_and_background_shapes():
    det = tiny_detector().eval()
    images, targets = tiny_batch()
    image_list, targets = det.prepare(images, targets)
    features = det.backbone_features(image_list)
    assert list(features) == ["0"] and features["0"].shape[1] == det.feature_channels == 32
    boxes = [t["boxes"] for t in targets]
    pooled = det.pool(features, boxes, image_list.image_sizes)
    assert pooled.shape == (3, 32, 7, 7)
    assert det.embed(pooled).shape == (3, det.embed_dim) == (3, 1024)
    background = det.pool_background(features, boxes, image_list.image_sizes)
    assert background.shape == (2, 32, 7, 7)
    assert det.embed(background).shape == (2, 1024)


def test_pool_background_masks_box_cells_and_pools_by_hand():
    det = tiny_detector()
    s = det.stride  # cell (row i, col j) has its centre at ((j + .5) * s, (i + .5) * s)
    fmap = torch.arange(1, 2 * 7 * 7 + 1, dtype=torch.float32).reshape(1, 2, 7, 7)
    box_a = [0.0, 0.0, 2 * s, 2 * s]  # centres .5s and 1.5s inside: rows 0-1, cols 0-1
    box_b = [3.75 * s, 2.5 * s, 5 * s, 3.875 * s]  # x centre 4.5s -> col 4; y centres 2.5s, 3.5s -> rows 2, 3
    boxes = [torch.tensor([box_a, box_b])]
    out = det.pool_background({"0": fmap}, boxes, [(7 * s, 7 * s)])
    expected = fmap.clone()
    expected[..., 0:2, 0:2] = 0
    expected[..., 2:4, 4] = 0
    assert torch.equal(out, expected)  # a 7x7 map pools to itself: the result is F * mask

    # A 14x14 map: each output cell is the mean of a 2x2 block of the masked map.
    fmap14 = torch.arange(14 * 14, dtype=torch.float32).reshape(1, 1, 14, 14) + 1
    out14 = det.pool_background({"0": fmap14}, [torch.tensor([[0.0, 0.0, s, s]])], [(14 * s, 14 * s)])
    masked = fmap14.clone()
    masked[0, 0, 0, 0] = 0  # only the cell centred at (s/2, s/2) is inside the box
    by_hand = masked.reshape(1, 1, 7, 2, 7, 2).mean(dim=(3, 5))
    assert torch.allclose(out14, by_hand)
    assert out14[0, 0, 0, 0] == pytest.approx((0 + 2 + 15 + 16) / 4)

    # Cells beyond the image (batch padding) are left out: an 8x8 map of a 7s x 7s image pools its 7x7 corner.
    padded = torch.zeros(1, 2, 8, 8)
    padded[..., :7, :7] = fmap
    padded[..., 7, :] = padded[..., :, 7] = 1000.0
    assert torch.equal(det.pool_background({"0": padded}, boxes, [(7 * s, 7 * s)]), expected)


def test_supervised_losses_equal_forward_losses():
    det = tiny_detector().train()
    images, targets = tiny_batch()
    torch.manual_seed(5)
    expected = det(images, targets)
    torch.manual_seed(5)
    image_list, prepared = det.prepare(images, targets)
    got = det.supervised_losses(image_list, det.backbone_features(image_list), prepared)
    assert set(got) == set(expected) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        assert torch.equal(got[name], expected[name]), name
    with pytest.raises(RuntimeError, match="train mode"):
        det.eval().supervised_losses(image_list, det.backbone_features(image_list), prepared)


def test_gradients_reach_the_backbone_and_box_head():
    det = tiny_detector().train()
    images, targets = tiny_batch()
    sum(det(images, targets).values()).backward()
    first_conv = det.model.backbone.fine[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert det.model.roi_heads.box_head.fc6.weight.grad.abs().sum() > 0


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    det = tiny_detector().train()
    images, targets = tiny_batch()
    optimizer = torch.optim.SGD(det.parameters(), lr=0.01, momentum=0.9)

    def loss() -> torch.Tensor:
        torch.manual_seed(0)  # same RPN/ROI samples every time
        return sum(det(images, targets).values())

    before = loss().item()
    for _ in range(3):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < before


def test_detect_returns_original_coordinates_and_restores_mode():
    det = tiny_detector().train()
    images, _ = tiny_batch()
    big = torch.nn.functional.interpolate(images[0][None], size=(128, 256))[0]  # resized to 64x128 inside
    out = det.detect([big])
    assert det.training
    assert set(out[0]) == {"boxes", "labels", "scores"}
    assert out[0]["boxes"].shape[0] > 0
    assert out[0]["boxes"][:, 2].max() > 128  # mapped back beyond the resized width
    assert out[0]["boxes"][:, 2].max() <= 256 and out[0]["boxes"][:, 3].max() <= 128


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    det = tiny_detector(num_classes=2)
    path = tmp_path / "model.pt"
    checkpoint.save(path, det, det.cfg, ["car", "person"], extra={"stage": "test"})
    loaded, meta = checkpoint.load(path, "cpu")
    assert meta["class_names"] == ["car", "person"] and meta["num_classes"] == 2
    assert meta["config"] == det.cfg and meta["extra"] == {"stage": "test"}
    assert not loaded.training
    images, _ = tiny_batch()
    a, b = det.detect(images), loaded.detect(images)
    for x, y in zip(a, b):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(x[key], y[key])


def test_a_checkpoint_whose_config_lacks_a_field_is_a_clear_error(tmp_path):
    """A checkpoint written before a key existed that conf states (no code default) names the file and the key."""
    det = tiny_detector()
    path = tmp_path / "old.pt"
    checkpoint.save(path, det, det.cfg, ["car", "person"])
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["from_scratch"]
    torch.save(ckpt, path)
    with pytest.raises(VspaError, match=r"old\.pt: the detector checkpoint is incomplete.*'from_scratch'"):
        checkpoint.load(path)


def test_checkpoint_missing_or_corrupt_file_is_a_clear_error(tmp_path):
    with pytest.raises(VspaError, match=r"nope\.pt: detector checkpoint not found.*dvc repro"):
        checkpoint.load(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(VspaError, match=r"bad\.pt: cannot read"):
        checkpoint.load(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(VspaError, match=r"foreign\.pt: not a vspa detector checkpoint"):
        checkpoint.load(foreign)


def test_missing_pretrained_weights_say_how_to_get_them(tmp_path):
    cfg = detector_config(backbone="resnet50", pretrained_weights=str(tmp_path / "r50.pth"), anchor_sizes=None)
    with pytest.raises(VspaError, match=r"r50\.pth: model\.pretrained_weights file not found.*torch\.save"):
        build_detector(cfg, 2)


def test_pretrained_weights_are_loaded_and_frozen_or_rejected(tmp_path):
    conv1 = torch.randn(64, 3, 7, 7)
    good = tmp_path / "partial.pth"
    torch.save(OrderedDict([("conv1.weight", conv1), ("fc.weight", torch.zeros(2, 2))]), good)
    cfg = detector_config(
        backbone="resnet50", pretrained_weights=str(good), min_size=64, max_size=128, anchor_sizes=None
    )
    det = build_detector(cfg, 1)
    body = det.model.backbone.body
    assert torch.equal(body.conv1.weight, conv1) and not body.conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad

    unrelated = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(VspaError, match=r"other\.pth: none of its 1 tensors matches the resnet50"):
        build_detector(detector_config(backbone="resnet50", pretrained_weights=str(unrelated), anchor_sizes=None), 1)


@pytest.mark.parametrize("backbone,channels", [("resnet50", 1024), ("vgg16", 512)])
def test_large_backbones_give_1024d_embeddings(backbone, channels):
    torch.manual_seed(0)
    # anchor_sizes null: the backbone's own anchors (the default section has the small backbone's)
    det = build_detector(detector_config(backbone=backbone, min_size=64, max_size=128, anchor_sizes=None), 3).eval()
    assert det.feature_channels == channels and det.stride == 16
    with torch.no_grad():
        image_list, _ = det.prepare([torch.rand(3, 64, 128)])
        features = det.backbone_features(image_list)
        assert features["0"].shape == (1, channels, 4, 8)
        emb = det.embed(det.pool(features, [torch.tensor([[8.0, 8.0, 40.0, 56.0]])], image_list.image_sizes))
    assert emb.shape == (1, 1024)

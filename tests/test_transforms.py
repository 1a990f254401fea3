"""Weak (flip) and strong (photometric) augmentations: exact box flips, determinism, geometry kept."""

from __future__ import annotations

import pytest
import torch

from vspa.data.transforms import as_generator, flip_boxes, strong, weak


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny images: torch's thread pool only adds overhead (10x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(h=12, w=10, seed=0) -> torch.Tensor:
    return torch.rand((3, h, w), generator=torch.Generator().manual_seed(seed))


def _target() -> dict:
    return {
        "boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 10.0, 12.0]]),
        "labels": torch.tensor([1, 2]),
        "ignore_boxes": torch.tensor([[7.5, 1.0, 9.0, 3.0]]),
        "image_id": 3,
    }


def test_flip_boxes_by_hand():
    assert flip_boxes(torch.tensor([[1.0, 2.0, 4.0, 5.0]]), 10).tolist() == [[6.0, 2.0, 9.0, 5.0]]
    assert flip_boxes(torch.zeros((0, 4)), 10).shape == (0, 4)


def test_weak_flips_image_and_boxes_exactly_or_leaves_both():
    image, target = _image(), _target()
    outcomes = set()
    for seed in range(20):
        out, t = weak(image, target, torch.Generator().manual_seed(seed))
        outcomes.add(t["flipped"])
        if t["flipped"]:
            assert torch.equal(out, image.flip(-1))
            assert t["boxes"].tolist() == [[6.0, 2.0, 9.0, 5.0], [0.0, 0.0, 10.0, 12.0]]
            assert t["ignore_boxes"].tolist() == [[1.0, 1.0, 2.5, 3.0]]
        else:
            assert torch.equal(out, image) and torch.equal(t["boxes"], target["boxes"])
        assert torch.equal(t["labels"], target["labels"]) and t["image_id"] == 3
    assert outcomes == {True, False}
    assert target["boxes"].tolist() == [[1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 10.0, 12.0]]  # input untouched


def test_flipped_boxes_cover_the_same_pixels():
    image = torch.zeros((3, 8, 16))
    image[:, 2:5, 3:7] = 1.0  # box [3, 2, 7, 5]
    target = {"boxes": torch.tensor([[3.0, 2.0, 7.0, 5.0]])}
    for seed in range(10):
        out, t = weak(image, target, seed)
        x0, y0, x1, y1 = (int(v) for v in t["boxes"][0])
        assert out[:, y0:y1, x0:x1].min() == 1.0 and out.sum() == image.sum()


def test_same_generator_state_same_output_and_different_seeds_differ():
    image = _image(32, 48)
    a = strong(image, torch.Generator().manual_seed(5))
    b = strong(image, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    outputs = {tuple(strong(image, seed).flatten()[:50].tolist()) for seed in range(6)}
    assert len(outputs) == 6
    g = as_generator(3)
    first = strong(image, g)
    assert not torch.equal(first, strong(image, g))  # the generator advances


def test_strong_is_photometric_only():
    image = torch.zeros((3, 33, 41))
    image[:, 10:17, 20:27] = torch.tensor([0.9, 0.5, 0.2])[:, None, None]  # a square centred at (13, 23)
    rows, cols = torch.arange(33.0)[:, None], torch.arange(41.0)[None, :]
    for seed in range(12):
        out = strong(image, seed, erase=False)
        assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1
        signal = (out.mean(0) - out.mean(0)[0, 0]).abs()  # background corner as reference
        inside = signal[10:17, 20:27].sum()
        total = signal.sum()
        assert inside / 49 > 2 * (total - inside) / (signal.numel() - 49)
        assert abs((signal * rows).sum() / total - 13) < 0.5 and abs((signal * cols).sum() / total - 23) < 0.5
    assert image[0, 0, 0] == 0 and image[0, 12, 22] == 0.9  # input untouched


def test_strong_probabilities_roughly_as_specified():
    image = _image(16, 16)
    gray = sum(
        bool(torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]))
        for out in (strong(image, seed, erase=False) for seed in range(200))
    )
    assert 20 <= gray <= 60  # grayscale p = 0.2
    erased = sum(bool((strong(image, seed) != strong(image, seed, erase=False)).any()) for seed in range(100))
    assert 78 <= erased <= 98  # 1 - 0.3 * 0.5 * 0.7 = 0.895

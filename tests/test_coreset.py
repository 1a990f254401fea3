"""Greedy k-center coresets: selection order by hand, coverage radius, per-class subsampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vspa.coreset.kcenter import (
    coverage_radius,
    kcenter_greedy,
    num_to_keep,
    random_subsample,
    subsample_memory,
    subsample_per_class,
)
from vspa.memory.store import MemoryBank
from vspa.utils import VspaError

# Five directions in the plane (degrees) with different lengths: only the direction may matter.
ANGLES = [0.0, 25.0, 100.0, 185.0, 250.0]
LENGTHS = [1.0, 3.0, 0.5, 2.0, 7.0]
# Farthest-point order for each possible first centre, worked out by hand from the angular distances
# (0-25: 25, 0-100: 100, 0-185: 175, 0-250: 110, 25-100: 75, 25-185: 160, 25-250: 135, 100-185: 85,
#  100-250: 150, 185-250: 65); e.g. from 0: 185 is farthest (175), then 100 (min(100, 85) = 85 beats
#  250's min(110, 65) = 65 and 25's 25), then 250 (65), then 25.
ORDER_FROM = {0: [0, 3, 2, 4, 1], 1: [1, 3, 2, 4, 0], 2: [2, 4, 0, 3, 1], 3: [3, 0, 2, 4, 1], 4: [4, 2, 0, 3, 1]}


def circle_points() -> torch.Tensor:
    a = torch.tensor(ANGLES, dtype=torch.float64) * math.pi / 180
    return (torch.stack([a.cos(), a.sin()], dim=1) * torch.tensor(LENGTHS, dtype=torch.float64)[:, None]).float()


def chord(degrees: float) -> float:
    return 2 * math.sin(math.radians(degrees) / 2)


def test_selection_order_matches_the_hand_computed_case():
    x = circle_points()
    firsts = set()
    for seed in range(12):
        order = kcenter_greedy(x, 5, seed=seed).tolist()
        firsts.add(order[0])
        assert order == ORDER_FROM[order[0]], seed
        assert kcenter_greedy(x, 3, seed=seed).tolist() == order[:3]  # a smaller k is a prefix
        assert kcenter_greedy(x, 5, seed=seed).tolist() == order  # deterministic by seed
    assert len(firsts) > 1  # the seed does choose the first centre


def plain_farthest_point(x: np.ndarray, k: int, first: int) -> list[int]:
    """The textbook algorithm in float64, one centre at a time (the reference)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    nearest = np.full(len(x), np.inf)
    order = [first]
    for _ in range(k - 1):
        nearest = np.minimum(nearest, ((x - x[order[-1]]) ** 2).sum(axis=1))
        nearest[order] = -np.inf
        order.append(int(nearest.argmax()))
    return order


@pytest.mark.parametrize("block", [1, 3, 64])
def test_blocked_selection_equals_the_plain_algorithm(block):
    x = np.random.default_rng(7).normal(size=(400, 12))
    got = kcenter_greedy(x, 150, seed=3, block=block).tolist()
    assert got == plain_farthest_point(x, 150, got[0])
    # a cap on the distance block's size (memory) changes nothing either
    assert kcenter_greedy(x, 150, seed=3, block=block, max_block_elements=800).tolist() == got


def test_duplicates_are_never_selected_twice():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    order = kcenter_greedy(x, 4, seed=0).tolist()
    assert sorted(order) == [0, 1, 2, 3]


def test_coverage_radius_by_hand():
    x = circle_points()
    # kept {0, 185}: 25 -> 0 (25 deg), 100 -> 185 (85 deg), 250 -> 185 (65 deg): the radius is the 85 deg chord
    assert coverage_radius(x, [0, 3]) == pytest.approx(chord(85), abs=1e-6)
    assert coverage_radius(x, [0, 3], chunk_rows=1) == pytest.approx(chord(85), abs=1e-6)
    assert coverage_radius(x, [0, 1, 2, 3, 4]) == 0.0
    # the greedy prefix of length k is a 2-approximation; here the 3-prefix from 0 leaves 250 at 65 deg
    assert coverage_radius(x, kcenter_greedy(x, 3, seed=0)) <= chord(85) + 1e-6


def clustered(n_clusters=30, seed=0, dim=32):
    """Clusters of very different sizes (5 to ~400 points): random subsets miss the small ones."""
    g = torch.Generator().manual_seed(seed)
    sizes = [5 + int(400 * (i / n_clusters) ** 3) for i in range(n_clusters)]
    centres = torch.randn(n_clusters, dim, generator=g)
    x = torch.cat([c + 0.15 * torch.randn(s, dim, generator=g) for c, s in zip(centres, sizes)])
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coreset_radius_is_below_random_on_clustered_data(seed):
    x = clustered(seed=seed)
    k = num_to_keep(len(x), 0.1)
    core = kcenter_greedy(x, k, seed=seed)
    rand = random_subsample(len(x), k, seed=seed)
    assert coverage_radius(x, core) < 0.8 * coverage_radius(x, rand)
    projected = kcenter_greedy(x, k, seed=seed, projection_dim=8)
    assert coverage_radius(x, projected) < coverage_radius(x, rand)


def test_num_to_keep_and_random_subsample():
    assert [num_to_keep(n, 0.5) for n in (0, 1, 2, 3, 5, 10)] == [0, 1, 1, 2, 3, 5]
    assert num_to_keep(10, 0.3) == 3 and num_to_keep(7, 1.0) == 7
    with pytest.raises(VspaError, match="ratio 0 is outside"):
        num_to_keep(10, 0)
    r = random_subsample(100, 30, seed=4)
    assert len(set(r.tolist())) == 30 and r.tolist() == sorted(r.tolist())
    assert torch.equal(r, random_subsample(100, 30, seed=4)) and not torch.equal(r, random_subsample(100, 30, seed=5))


def test_subsample_per_class_keeps_each_class_separately():
    x = clustered(n_clusters=6)
    labels = np.arange(len(x)) % 3 + 1
    labels[:4] = 1
    kept = subsample_per_class(x, labels, 0.25, "coreset", seed=0)
    for c in (1, 2, 3):
        n_c = int((labels == c).sum())
        assert int((labels[kept] == c).sum()) == num_to_keep(n_c, 0.25)
    # the same as running k-center on each class alone
    rows = np.flatnonzero(labels == 2)
    alone = kcenter_greedy(x[torch.from_numpy(rows)], num_to_keep(len(rows), 0.25), seed=2)
    assert sorted(rows[alone.numpy()].tolist()) == [r for r in kept.tolist() if labels[r] == 2]
    with pytest.raises(VspaError, match="subsample.method 'best'"):
        subsample_per_class(x, labels, 0.5, "best")


def test_subsample_memory_subset_index_and_coverage_report():
    x = clustered(n_clusters=8, seed=3).numpy()
    n = len(x)
    bank = MemoryBank(
        fg_features=x,
        fg_labels=np.arange(n) % 2 + 1,
        fg_image_ids=np.arange(n),
        fg_object_ids=np.arange(n) + 7,
        fg_boxes=np.zeros((n, 4), np.float32),
        bg_features=x[:50],
        bg_image_ids=np.arange(50) + 1000,
        attrs={"class_names": ["car", "person"], "keep": "all"},
    )
    subset, report = subsample_memory(bank, method="coreset", fg_ratio=0.5, bg_ratio=0.3, seed=1)
    assert len(subset.fg_labels) == sum(num_to_keep(int((bank.fg_labels == c).sum()), 0.5) for c in (1, 2))
    assert len(subset.bg_image_ids) == 15
    assert np.array_equal(subset.fg_features, x[subset.fg_index])
    assert np.array_equal(subset.fg_object_ids, subset.fg_index + 7)
    assert np.array_equal(subset.bg_image_ids, subset.bg_index + 1000)
    assert subset.attrs["subsample_method"] == "coreset" and subset.attrs["fg_ratio"] == 0.5
    car = report["fg"]["per_class"]["car"]
    car_rows = np.flatnonzero(bank.fg_labels == 1)
    kept_local = np.flatnonzero(np.isin(car_rows, subset.fg_index))
    assert car["radius"] == pytest.approx(coverage_radius(x[car_rows], kept_local))
    assert car["radius"] < car["random_radius"]
    assert report["fg"]["radius"] == max(v["radius"] for v in report["fg"]["per_class"].values())
    everything, report_none = subsample_memory(bank, method="none")
    assert len(everything.fg_labels) == n and report_none["fg"]["radius"] == 0.0

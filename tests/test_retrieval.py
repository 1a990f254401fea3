"""Per-class top-k cosine retrieval and random negatives from a memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vspa.memory.retrieval import Retriever
from vspa.memory.store import MemoryBank
from vspa.utils import VspaError


def bank_of(labels, d=16, m=20, seed=0, names=("car", "person", "truck")) -> MemoryBank:
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    n = len(labels)
    return MemoryBank(
        fg_features=(rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=(n, 1))).astype(np.float32),
        fg_labels=labels,
        fg_image_ids=np.arange(n),
        fg_object_ids=np.arange(n),
        fg_boxes=np.zeros((n, 4), np.float32),
        bg_features=rng.normal(size=(m, d)).astype(np.float32),
        bg_image_ids=np.arange(m),
        attrs={"class_names": list(names)},
    )


def test_planted_nearest_neighbour_is_found_within_its_class():
    labels = np.random.default_rng(1).integers(1, 4, size=300)
    bank = bank_of(labels)
    planted = [5, 77, 150, 299]
    g = torch.Generator().manual_seed(0)
    feats = torch.from_numpy(bank.fg_features)
    queries = 4.0 * feats[planted] + 0.01 * torch.randn(4, 16, generator=g)  # scaled: cosine ignores length
    for chunk_rows in (7, 65536):  # chunked merging gives the same answer
        idx, sims = Retriever(bank, chunk_rows=chunk_rows).topk(queries, torch.from_numpy(labels[planted]), k=3)
        assert idx[:, 0].tolist() == planted
        assert (sims[:, 0] > 0.99).all() and (sims[:, :-1] >= sims[:, 1:]).all()
        direct = F.cosine_similarity(queries[:, None, :], feats[idx], dim=2)
        assert torch.allclose(sims, direct, atol=1e-5)
        assert (torch.from_numpy(labels)[idx] == torch.from_numpy(labels[planted])[:, None]).all()
    # top-1 over the class equals the brute-force argmax over that class's rows
    q = torch.randn(50, 16, generator=g)
    ql = torch.randint(1, 4, (50,), generator=g)
    idx, _ = Retriever(bank, chunk_rows=11).topk(q, ql, k=1)
    cos = F.normalize(q, dim=1) @ F.normalize(feats, dim=1).T
    cos[torch.from_numpy(labels)[None, :] != ql[:, None]] = -2
    assert idx[:, 0].tolist() == cos.argmax(dim=1).tolist()


def test_retrieval_never_crosses_classes():
    labels = np.array([1] * 10 + [2] * 10 + [3] * 10)
    bank = bank_of(labels)
    r = Retriever(bank)
    # each query is an exact copy of a "person" row but asks for a "car" neighbour
    queries = torch.from_numpy(bank.fg_features[10:20])
    idx, sims = r.topk(queries, torch.ones(10, dtype=torch.long), k=10)
    assert sorted(idx[0].tolist()) == list(range(10))  # all 10 car rows, none of the identical person rows
    assert (sims < 0.999).all()
    idx, sims = r.topk(queries, torch.full((10,), 2), k=1)
    assert idx[:, 0].tolist() == list(range(10, 20))


def test_background_topk_and_vectors():
    bank = bank_of([1, 2, 3, 1, 2, 3])
    r = Retriever(bank)
    bg = torch.from_numpy(bank.bg_features)
    idx, sims = r.topk_background(2 * bg[[3, 11]], k=2)
    assert idx[:, 0].tolist() == [3, 11] and torch.allclose(sims[:, 0], torch.ones(2), atol=1e-5)
    assert torch.allclose(r.bg_vectors(idx[:, 0]), F.normalize(bg[[3, 11]], dim=1))
    rows = torch.tensor([4, 0, 5])
    assert torch.allclose(r.fg_vectors(rows), F.normalize(torch.from_numpy(bank.fg_features)[rows], dim=1))


def test_random_negative_is_another_class_uniformly_and_reproducible():
    labels = np.array([1] * 3 + [2] * 5 + [3] * 2)
    r = Retriever(bank_of(labels))
    assert not r.negatives_from_background
    q = torch.tensor([1, 2, 3] * 2000)
    neg = r.random_negative(q, torch.Generator().manual_seed(0))
    assert (torch.from_numpy(labels)[neg] != q).all()
    # class 2's negatives are spread over the 5 rows of classes 1 and 3
    counts = torch.bincount(neg[q == 2], minlength=10)
    assert counts[[0, 1, 2, 8, 9]].min() > 300 and counts[3:8].sum() == 0
    assert torch.equal(neg, r.random_negative(q, torch.Generator().manual_seed(0)))


def test_single_class_negatives_come_from_the_background():
    r = Retriever(bank_of([1] * 8, m=6, names=("car",)))
    assert r.negatives_from_background
    neg = r.random_negative(torch.ones(500, dtype=torch.long), torch.Generator().manual_seed(1))
    assert neg.min() >= 0 and neg.max() <= 5 and len(neg.unique()) == 6


def test_bad_queries_are_clear_errors():
    r = Retriever(bank_of([1, 1, 2, 3]))
    with pytest.raises(VspaError, match="top-k=2 but class 'person' has only 1"):
        r.topk(torch.randn(2, 16), torch.tensor([1, 2]), k=2)
    with pytest.raises(VspaError, match="query label 4 is outside the memory's classes 1..3"):
        r.topk(torch.randn(1, 16), torch.tensor([4]), k=1)
    with pytest.raises(VspaError, match="background memory has only 20"):
        r.topk_background(torch.randn(1, 16), k=21)

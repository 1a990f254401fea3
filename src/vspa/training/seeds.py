"""Seed streams: every random draw of a training loop comes from a generator seeded by a tuple of integers.

A loop seeds iteration ``k``'s generators with ``derive_seed(seed, k, ..., stream)``, where a small stream id
keeps apart draws made for different purposes (batch order, augmentation, samplers, ...). The random state at
a checkpoint is then a function of the iteration alone, which is what makes a run killed and resumed from
its checkpoint equal to one that never stopped. The stream ids belong to the loops; :data:`BATCH_ORDER` is
the one :func:`global_batch` uses.

The numbers are part of every recorded result: changing :func:`derive_seed` or :func:`global_batch` changes
every training run (tests/test_training_plumbing.py pins their values).
"""

from __future__ import annotations

import numpy as np
import torch

BATCH_ORDER = 0  # stream id of the per-epoch permutations of global_batch: derive_seed(seed, epoch, BATCH_ORDER)


def derive_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative integers."""
    high, low = np.random.SeedSequence(list(numbers)).generate_state(2)
    return (int(high) << 31) ^ int(low)


def global_batch(num_items: int, batch_size: int, seed: int, iteration: int) -> list[int]:
    """Dataset indices of iteration ``iteration``'s global batch.

    Items are taken in the order of a permutation drawn afresh for each epoch (seeded by ``seed`` and the
    epoch), so every item is used once per epoch; a batch may straddle two epochs.
    """
    out = []
    for position in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, offset = divmod(position, num_items)
        g = torch.Generator().manual_seed(derive_seed(seed, epoch, BATCH_ORDER))
        out.append(int(torch.randperm(num_items, generator=g)[offset]))
    return out

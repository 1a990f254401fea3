"""The optimiser and its learning-rate schedule, shared by the detector and adaptation loops.

Both loops use SGD with momentum and weight decay, and a ``LambdaLR`` whose factor is :func:`lr_factor`: a
linear warm-up from :data:`WARMUP_FACTOR` to 1 over ``warmup_iters`` iterations, times 0.1 for every step of
``lr_steps`` passed (the adaptation has none: a constant rate after the warm-up, as in the paper). The
configs keep an ``lr_factor(iteration)`` method that calls :func:`lr_factor`; that bound method is what the
scheduler holds, so the scheduler's state (and with it the checkpoints) is as it was before this module.
:func:`sgd_checks` are the value checks both configs make on the keys of this loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

WARMUP_FACTOR = 0.001  # lr multiplier at iteration 0, rising linearly to 1 at warmup_iters


def sgd_checks(cfg: Any) -> list[tuple[bool, str, str]]:
    """``(ok, key, requirement)`` for the keys every SGD loop's config has (``iterations``, ``batch_size``, ``lr``,
    ``momentum``, ``weight_decay``, ``warmup_iters``, ``checkpoint_every``), for
    :func:`vspa.config.check_number` (``path: <section>.<key> must be <requirement>, got <value>``)."""
    return [
        (cfg.iterations >= 1, "iterations", ">= 1"),
        (cfg.batch_size >= 1, "batch_size", ">= 1"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), "lr", "a positive number"),
        (0 <= cfg.momentum < 1, "momentum", "in [0, 1)"),
        (cfg.weight_decay >= 0, "weight_decay", ">= 0"),
        (cfg.warmup_iters >= 0, "warmup_iters", ">= 0"),
        (cfg.checkpoint_every >= 1, "checkpoint_every", ">= 1"),
    ]


def lr_factor(iteration: int, warmup_iters: int, lr_steps: Sequence[int] = ()) -> float:
    """Multiplier of the base lr at a 0-based iteration: linear warm-up, then x0.1 at each step passed."""
    factor = 0.1 ** sum(iteration >= s for s in lr_steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= WARMUP_FACTOR * (1 - alpha) + alpha
    return factor


def sgd_with_schedule(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    momentum: float,
    weight_decay: float,
    factor: Callable[[int], float],
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """``(optimizer, scheduler)``: SGD over ``params`` and a LambdaLR applying ``factor(iteration)``.

    Call ``scheduler.step()`` after every ``optimizer.step()``; both state dicts go into the training state.
    """
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

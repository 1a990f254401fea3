"""Batches prepared ahead of the compute: :class:`Prefetcher` and :func:`to_device`.

A training loop's batch of iteration ``i`` is a pure function of the seed and ``i`` (every random draw comes
from a generator seeded with ``derive_seed(seed, i, ...)``; no global RNG), so it can be made early, in another
thread, without changing a single number. On a GPU node the loop otherwise leaves the GPU idle while it reads,
decodes and augments the next images in Python (on the real-data presets, 2048 x 1024 PNGs: tens of
milliseconds an image); with ``workers`` threads, up to ``workers + 1`` future batches are in preparation
while the current one computes. PIL's decoding and torch's operators release the GIL, so the threads run in
parallel with the loop. Each thread computes with the loop's intra-op thread count: with one core per thread
instead, 20 VSPA iterations at 2 threads gave other losses from iteration 3 on (a reduction in the
augmentations rounds differently), so the identity below would hold only for single-threaded loops.

On the CPU the compute already uses every core and the data is 3-5% of an iteration
(``reports/bench/iteration.md``): one data thread made pretrain 0.78x and adaptation 0.80x as fast on the
2-core machine (``reports/bench/prefetch_cpu/loop_threads``), so the CPU default is none.
``VSPA_DATA_WORKERS`` overrides the default (``0`` = make each batch in the loop, as before); the results are
the same for every value (``tests/test_prefetch.py``), so it is not a param and DVC does not track it. With a
data thread, an iteration's logged time (``time_iter`` of the adaptation log) holds only the wait for its batch,
not the making of it: compare such times only between runs with the same count.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from vspa.utils import VspaError

ENV = "VSPA_DATA_WORKERS"


def default_workers(device: torch.device | str) -> int:
    """Threads that prepare batches: ``VSPA_DATA_WORKERS`` when set; else none on the CPU and one on CUDA. One,
    because each data thread computes with the loop's intra-op thread count (see the module docstring): more
    threads would each start a team of that size beside the loop. Not measured on a GPU: ``make gpu-check``
    reports the count, ``bench_iteration.py --device cuda`` times it against none."""
    value = os.environ.get(ENV, "").strip()
    if value:
        if not (value.isascii() and value.isdigit()):
            raise VspaError(f"{ENV}={value!r}: expected a whole number of threads (0 = no prefetching).")
        return int(value)
    return 1 if torch.device(device).type == "cuda" else 0


def _map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside its lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map(v, fn) for v in obj)
    return obj


def pinned(obj: Any, enabled: bool = True) -> Any:
    """``obj`` with its tensors in pinned host memory when ``enabled`` (for the asynchronous copy to CUDA; a
    batch maker pins what :func:`to_device` will copy, and only that), else ``obj`` itself."""
    return _map(obj, torch.Tensor.pin_memory) if enabled else obj


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` (tensors inside lists, tuples and dicts) on ``device``. To CUDA the host tensors are copied
    asynchronously from pinned memory (pinned here unless a data thread did it already; the copy is ordered
    before the kernels that read it on the same stream); on the CPU the objects come back as they are."""
    device = torch.device(device)

    def move(x: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and x.device.type == "cpu":
            return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
        return x.to(device)

    return _map(obj, move)


class Prefetcher:
    """``make(i)`` for each ``i`` of ``iterations``, in order, with up to ``workers + 1`` of them made ahead in
    ``workers`` background threads (``workers`` = 0: each one made when it is asked for, in the caller's thread).

    An exception raised by ``make`` is raised again by the iteration that asked for its batch. Use as a context
    manager (or call :meth:`close`) so that the threads stop when the loop ends early (an error, a kill
    signal turned into an exception): batches not started yet are cancelled, running ones are waited for.
    """

    def __init__(self, make: Callable[[int], Any], iterations: Iterable[int], workers: int = 0):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.make = make
        self.iterations = list(iterations)
        self.workers = int(workers)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def __iter__(self) -> Iterator[Any]:
        if self.workers == 0:
            for it in self.iterations:
                yield self.make(it)
            return
        # the loop's intra-op thread count in every data thread (with torch's OpenMP build the count is per thread,
        # and a new thread starts from the machine's default): the augmentations' reductions (e.g. the image mean
        # of the contrast jitter) round differently with another count, and a batch must not depend on where
        # it was made
        self._pool = ThreadPoolExecutor(
            max_workers=self.workers,
            thread_name_prefix="vspa-data",
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )
        todo = iter(self.iterations)
        try:
            for it in todo:  # fill the window
                self._pending.append(self._pool.submit(self.make, it))
                if len(self._pending) > self.workers:
                    break
            while self._pending:
                future = self._pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    self._pending.append(self._pool.submit(self.make, nxt))
                yield future.result()
        finally:
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Batched top-k cosine retrieval from a memory, per class, on the GPU when present.

The foreground rows of each class are held as one L2-normalised matrix on the device; a batch of queries
of that class is answered with one matrix product against it (in blocks of ``chunk_rows`` memory rows when
the class is large, merging the blocks' top-k). Queries are only ever compared with rows of their own
class. Everything here runs without gradient: the adaptation loss recomputes what it needs from the
returned indices.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vspa.memory.store import MemoryBank
from vspa.utils import VspaError


def _topk_chunked(queries: torch.Tensor, matrix: torch.Tensor, k: int, chunk_rows: int):
    """Top-k of ``queries @ matrix.T`` over the rows of ``matrix``, ``chunk_rows`` rows at a time."""
    best_sims = best_idx = None
    for start in range(0, matrix.shape[0], chunk_rows):
        sims = queries @ matrix[start : start + chunk_rows].T
        kk = min(k, sims.shape[1])
        s, i = sims.topk(kk, dim=1)
        i = i + start
        if best_sims is None:
            best_sims, best_idx = s, i
        else:
            s = torch.cat([best_sims, s], dim=1)
            i = torch.cat([best_idx, i], dim=1)
            best_sims, pos = s.topk(k, dim=1)
            best_idx = i.gather(1, pos)
    return best_sims, best_idx


def l2_normalize(x) -> torch.Tensor:
    """Rows of ``x`` as float32 unit vectors (an all-zero row stays zero)."""
    return F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)


class Retriever:
    """Cosine nearest neighbours in a :class:`MemoryBank`, per class for the foreground.

    Indices returned by :meth:`topk` and :meth:`random_negative` are rows of ``bank``'s foreground arrays
    (``bank.fg_features[i]``); :meth:`topk_background` returns rows of the background arrays.
    """

    def __init__(self, bank: MemoryBank, device: str | torch.device = "cpu", chunk_rows: int = 65536):
        self.device = torch.device(device)
        self.chunk_rows = chunk_rows
        self.class_names = bank.class_names
        self.num_classes = bank.num_classes
        labels = torch.as_tensor(np.asarray(bank.fg_labels, dtype=np.int64))
        # fg rows grouped by class: rows order[offsets[c-1]:offsets[c]] are class c (labels 1..C)
        self._order = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=self.num_classes + 1)[1 : self.num_classes + 1]
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.counts.cumsum(0)])
        # one normalised copy on the device, sorted by class: each class matrix is a view of it
        feats = l2_normalize(torch.as_tensor(bank.fg_features))
        self._sorted = feats[self._order].to(self.device)
        self._position = torch.empty_like(self._order)
        self._position[self._order] = torch.arange(len(self._order))
        self._position = self._position.to(self.device)
        self._class_rows = {}
        self._class_feats = {}
        for c in range(1, self.num_classes + 1):
            lo, hi = int(self._offsets[c - 1]), int(self._offsets[c])
            self._class_rows[c] = self._order[lo:hi].to(self.device)
            self._class_feats[c] = self._sorted[lo:hi]
        self.bg = l2_normalize(torch.as_tensor(bank.bg_features)).to(self.device)
        self.negatives_from_background = self.num_classes < 2

    def _check_labels(self, labels: torch.Tensor, k: int) -> None:
        bad = (labels < 1) | (labels > self.num_classes)
        if bad.any():
            raise VspaError(
                f"retrieval: query label {int(labels[bad][0])} is outside the memory's classes 1..{self.num_classes} "
                f"({self.class_names}). The detector and the memory disagree on the classes: re-extract the memory."
            )
        for c in labels.unique().tolist():
            if int(self.counts[c - 1]) < k:
                raise VspaError(
                    f"retrieval: top-k={k} but class '{self.class_names[c - 1]}' has only "
                    f"{int(self.counts[c - 1])} memory entries. Lower adapt top-k or subsample less."
                )

    @torch.no_grad()
    def topk(self, queries: torch.Tensor, labels: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """For each query [Q, D] with class ``labels`` [Q], the ``k`` most cosine-similar foreground rows of the
        same class: ``(indices [Q, k] int64, similarities [Q, k])`` on the retriever's device, best first."""
        labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        q = l2_normalize(queries.detach().to(self.device))
        self._check_labels(labels, k)
        out_idx = torch.empty(len(q), k, dtype=torch.long, device=self.device)
        out_sim = torch.empty(len(q), k, dtype=q.dtype, device=self.device)
        for c in labels.unique().tolist():
            sel = torch.nonzero(labels == c).flatten()
            sims, local = _topk_chunked(q[sel], self._class_feats[c], k, self.chunk_rows)
            out_idx[sel] = self._class_rows[c][local]
            out_sim[sel] = sims
        return out_idx, out_sim

    @torch.no_grad()
    def topk_background(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most cosine-similar background rows of each query: ``(indices [Q, k], similarities [Q, k])``."""
        if k > len(self.bg):
            raise VspaError(f"retrieval: top-k={k} but the background memory has only {len(self.bg)} entries.")
        q = l2_normalize(queries.detach().to(self.device))
        sims, idx = _topk_chunked(q, self.bg, k, self.chunk_rows)
        return idx, sims

    def random_negative(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """For each label, a uniformly random foreground row of a different class (int64 [Q] on the device).

        With a single class (``negatives_from_background``) the rows are background rows instead.
        ``generator`` is a CPU generator, so the draw is reproducible whatever the device.
        """
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        u = torch.rand(len(labels), generator=generator)
        if self.negatives_from_background:
            return (u * len(self.bg)).long().clamp_max(len(self.bg) - 1).to(self.device)
        self._check_labels(labels, 0)
        n = int(self._offsets[-1])
        own = self.counts[labels - 1]
        if (own == n).any():
            raise VspaError("retrieval: no memory entry of another class exists for a negative. Re-extract the memory.")
        # draw a position among the n - own rows outside the label's block, then step over the block
        pos = (u * (n - own)).long().minimum(n - own - 1)
        start = self._offsets[labels - 1]
        pos = torch.where(pos >= start, pos + own, pos)
        return self._order[pos].to(self.device)

    @torch.no_grad()
    def hard_negative(self, queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """For each query, the most cosine-similar foreground row of a *different* class (int64 [Q] on the
        device, rows as for :meth:`random_negative`). With a single class (``negatives_from_background``)
        the most similar background row instead."""
        if self.negatives_from_background:
            return self.topk_background(queries, k=1)[0][:, 0]
        labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        self._check_labels(labels, 0)
        if (self.counts[labels.cpu() - 1] == int(self._offsets[-1])).any():
            raise VspaError("retrieval: no memory entry of another class exists for a negative. Re-extract the memory.")
        q = l2_normalize(queries.detach().to(self.device))
        best_sim = torch.full((len(q),), float("-inf"), device=self.device)
        best_row = torch.zeros(len(q), dtype=torch.long, device=self.device)
        for c in range(1, self.num_classes + 1):  # the best row of every other class, then the best of those
            if int(self.counts[c - 1]) == 0:
                continue
            sims, local = _topk_chunked(q, self._class_feats[c], 1, self.chunk_rows)
            sims = sims[:, 0].masked_fill(labels == c, float("-inf"))
            better = sims > best_sim
            best_sim = torch.where(better, sims, best_sim)
            best_row = torch.where(better, self._class_rows[c][local[:, 0]], best_row)
        return best_row

    def fg_vectors(self, indices: torch.Tensor) -> torch.Tensor:
        """L2-normalised foreground rows ``indices`` (as returned by topk / random_negative)."""
        return self._sorted[self._position[indices.to(self.device)]]

    def bg_vectors(self, indices: torch.Tensor) -> torch.Tensor:
        """L2-normalised background rows ``indices``."""
        return self.bg[indices.to(self.device)]

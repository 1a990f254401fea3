"""The non-finite loss check of the training loops: stop with a VspaError naming the iteration and the fix."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from vspa.utils import VspaError


def check_finite(
    values: Mapping[str, float], iteration: int, what: str, advice: str, keys: Iterable[str] | None = None
) -> None:
    """Raise ``VspaError("<what> diverged at iteration <iteration>: non-finite loss (k=v, ...). <advice>")``
    when one of ``values[k]`` for ``k`` in ``keys`` (default: all) is NaN or infinite.

    ``iteration`` is 1-based (the row's number in the loss log); the message lists every value.
    """
    checked = values if keys is None else keys
    if all(math.isfinite(values[k]) for k in checked):
        return
    listed = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    raise VspaError(f"{what} diverged at iteration {iteration}: non-finite loss ({listed}). {advice}")

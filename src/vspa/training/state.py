"""The resumable training state: one file (``work_dir/last.pt``) per run, written atomically at checkpoints.

A state is a dict ``{"format", "fingerprint", "iteration", ...payload}``. ``format`` names the loop that wrote
it (e.g. ``vspa-train-state/1``); ``fingerprint`` is the loop's hash of everything a resumed run must share
with the run that wrote it (configuration less device and checkpoint interval, model, inputs).

The one rule for a state that cannot be resumed: a run resumes only from a readable state of its own format
and fingerprint. Anything else is not an error, since the state is only a shortcut to a deterministic result:

* missing (no file at the path): start from iteration 0, silently (a fresh run);
* unreadable (``torch.load`` fails: truncated, not a torch file, ...) or foreign (not a dict, another
  ``format``, another ``fingerprint``): start from iteration 0 with one line on stderr saying why; the file is
  overwritten at the first checkpoint.

Every fingerprint includes :func:`code_digest`, a hash of the package's source: a state written by other code
is foreign. Without it, `dvc repro` after a change to the training code (which DVC reruns the stage for) would
find the previous run's completed state in the work dir, "resume" at its last iteration and write the old
weights again.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path
from typing import Any

import torch

from vspa.utils import save_torch_atomic


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of every ``.py`` file of the ``vspa`` package (relative path and bytes, in sorted order)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def load_state(
    path: str | Path, fmt: str, fingerprint: str, tag: str, weights_only: bool = True
) -> dict[str, Any] | None:
    """The state in ``path`` if it is a readable ``fmt`` state with this ``fingerprint``, else None (see the
    module's rule; ``tag`` prefixes the message, e.g. ``train``). ``weights_only=False`` for states holding
    more than tensors and plain containers (e.g. RNG states); only for files this project wrote."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - an unreadable state only means starting over
        reason = f"unreadable ({type(exc).__name__})"
    else:
        if not isinstance(state, dict) or state.get("format") != fmt:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            reason = f"not a {fmt} state (found {found!r})"
        elif state.get("fingerprint") != fingerprint:
            reason = "written with a different configuration or different inputs"
        else:
            return state
    print(f"[{tag}] {path}: {reason}; starting from iteration 0 (it will be overwritten).", file=sys.stderr)
    return None


def save_state(path: str | Path, fmt: str, fingerprint: str, iteration: int, payload: dict[str, Any]) -> None:
    """Write ``{"format": fmt, "fingerprint": fingerprint, "iteration": iteration, **payload}`` to ``path``
    atomically (a kill mid-write leaves the previous state). The key order is part of the file's bytes."""
    save_torch_atomic({"format": fmt, "fingerprint": fingerprint, "iteration": iteration, **payload}, path)

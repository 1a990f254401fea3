"""Small shared helpers: atomic file output, params, seeding, devices, hashing, errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class VspaError(Exception):
    """An error meant for the user: the message names the file, the problem and the fix."""


# --------------------------------------------------------------------------- atomic output


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    An exception inside the block leaves any existing ``path`` untouched and removes the temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    import torch

    # Through a file object: torch.save then names the archive's root folder "archive"; given a path it would
    # use the random temp file's name, and two saves of the same weights would differ in their bytes (and DVC
    # would see a changed model where nothing changed).
    with atomic_path(path, suffix=".pt.tmp") as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


# --------------------------------------------------------------------------- params


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise VspaError(f"{path}: params file not found. Run from the project root, or pass --params PATH.")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise VspaError(f"{path}: not valid YAML ({exc}). Fix the syntax and rerun.") from exc
    if not isinstance(params, dict):
        raise VspaError(f"{path}: expected a mapping of stage sections at the top level.")
    return params


def section(params: dict, name: str, path: str = "params.yaml") -> dict:
    if name not in params or not isinstance(params[name], dict):
        raise VspaError(f"{path}: missing section '{name}:'. Add it (see the README's params table).")
    return params[name]


# --------------------------------------------------------------------------- reproducibility


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def get_device(name: str = "auto"):
    """'auto' -> cuda when present, else cpu; 'cpu' / 'cuda' / 'cuda:1' as given."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VspaError(f"device '{name}' was asked for but CUDA is not available. Set device: auto or cpu.")
    return dev


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- stage entry points


def run_stage(fn, *args, **kwargs):
    """Call a stage's body; a VspaError becomes a one-line message on stderr and exit status 2."""
    import sys

    try:
        return fn(*args, **kwargs)
    except VspaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

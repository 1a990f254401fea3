"""The loss log: one CSV row per iteration, written whole (atomically) at every checkpoint.

The rows live in the training state, so a resumed run rewrites the log with the rows of the run it continues
and the file always matches the state. Formatting: ``iteration`` as an integer, every other column with
``%.6g``; columns are fixed by the loop (extra keys of a row are ignored, a missing one is an error).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from vspa.utils import write_text_atomic


def csv_text(rows: Sequence[Mapping[str, float]], columns: Sequence[str]) -> str:
    """The CSV text of ``rows`` with the header ``columns``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (int(row[k]) if k == "iteration" else f"{row[k]:.6g}") for k in columns})
    return buf.getvalue()


def write_log(path: str | Path, rows: Sequence[Mapping[str, float]], columns: Sequence[str]) -> None:
    """Write :func:`csv_text` to ``path`` atomically (folders created)."""
    write_text_atomic(Path(path), csv_text(rows, columns))

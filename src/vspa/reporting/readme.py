"""README tables copied from the reports they summarise, never by hand.

A table in a markdown file is tied to its source by a marker on the line before it::

    <!-- table: reports/comparison.md -->
    | Method | ... |
    |---|...|
    | ... |

``<!-- table: PATH#N -->`` takes the N-th table (1-based) of ``PATH``; without ``#N`` the first. A table is a
run of consecutive lines that start with ``|``. :func:`sync` replaces every marked table by its source's
current one (``make readme``); ``tests/test_readme_tables.py`` fails when the README and the reports
disagree, so a rerun that changes a number also changes the README in the same commit.

    python -m vspa.reporting.readme README.md [--check]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from vspa.utils import VspaError, write_text_atomic

MARKER = re.compile(r"^<!-- table: (?P<path>[^#\s]+)(?:#(?P<index>\d+))? -->\s*$")


def tables(text: str) -> list[list[str]]:
    """Every table of ``text``: runs of consecutive lines that start with ``|``."""
    found, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    if current:
        found.append(current)
    return found


def source_table(root: Path, path: str, index: int, where: str) -> list[str]:
    source = root / path
    if not source.is_file():
        raise VspaError(
            f"{where}: the table's source {path} does not exist. Run the stage or benchmark that "
            "writes it, or fix the marker."
        )
    found = tables(source.read_text())
    if not 1 <= index <= len(found):
        raise VspaError(f"{where}: {path} has {len(found)} table(s), the marker asks for number {index}.")
    return found[index - 1]


def sync(text: str, root: Path, name: str = "README.md") -> str:
    """``text`` with every marked table replaced by its source's (see the module docstring)."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        match = MARKER.match(line)
        if not match:
            continue
        where = f"{name} line {i}"
        out.extend(source_table(root, match["path"], int(match["index"] or 1), where))
        if i >= len(lines) or not lines[i].startswith("|"):
            raise VspaError(f"{where}: a table marker must be followed by the table it stands for.")
        while i < len(lines) and lines[i].startswith("|"):
            i += 1  # the old copy
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"] or ["README.md"]
    stale = []
    for path in map(Path, paths):
        text = path.read_text()
        new = sync(text, path.resolve().parent, path.name)
        if new != text:
            stale.append(str(path))
            if not check:
                write_text_atomic(path, new)
    if check and stale:
        print(f"tables out of date in {', '.join(stale)}: run `make readme`.", file=sys.stderr)
        return 1
    if stale and not check:
        print(f"updated the tables of {', '.join(stale)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

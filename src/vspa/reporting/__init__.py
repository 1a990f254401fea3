"""Reports built from the metrics files: the comparison table of the methods (markdown + JSON)."""

from vspa.reporting.tables import (
    PAPER_RESULTS,
    ROW_DESCRIPTIONS,
    Row,
    build_comparison,
    default_rows,
    render_markdown,
    write_comparison,
)

__all__ = [
    "PAPER_RESULTS",
    "ROW_DESCRIPTIONS",
    "Row",
    "build_comparison",
    "default_rows",
    "render_markdown",
    "write_comparison",
]

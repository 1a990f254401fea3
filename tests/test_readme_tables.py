"""README tables are copies of the reports' tables (vspa.reporting.readme), checked here."""

import re
from pathlib import Path

import pytest

from vspa.reporting.readme import sync, tables
from vspa.utils import VspaError

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_match_their_reports():
    text = (ROOT / "README.md").read_text()
    assert text.count("<!-- table: ") >= 3  # the default run, the protocol, the translator rows at least
    assert sync(text, ROOT) == text, "README.md tables differ from the reports they copy: run `make readme`."


def test_sync_replaces_the_marked_table_only(tmp_path):
    (tmp_path / "r.md").write_text("intro\n| a | b |\n|---|---|\n| 1 | 2 |\n\ntext\n| c |\n|---|\n| 9 |\n")
    readme = (
        "# x\n<!-- table: r.md#2 -->\n| c |\n|---|\n| 8 |\n| 7 |\nafter\n"
        "<!-- table: r.md -->\n| old |\n\n| unmarked |\n"
    )
    new = sync(readme, tmp_path)
    assert new == (
        "# x\n<!-- table: r.md#2 -->\n| c |\n|---|\n| 9 |\nafter\n"
        "<!-- table: r.md -->\n| a | b |\n|---|---|\n| 1 | 2 |\n\n| unmarked |\n"
    )
    assert sync(new, tmp_path) == new
    assert tables(new)[-1] == ["| unmarked |"]


@pytest.mark.parametrize(
    "readme, message",
    [
        ("<!-- table: missing.md -->\n| x |\n", "missing.md does not exist"),
        ("<!-- table: r.md#3 -->\n| x |\n", "has 1 table(s), the marker asks for number 3"),
        ("<!-- table: r.md -->\nno table\n", "must be followed by the table"),
    ],
)
def test_sync_errors_name_the_line_and_the_fix(tmp_path, readme, message):
    (tmp_path / "r.md").write_text("| a |\n")
    with pytest.raises(VspaError, match=re.escape(message)) as exc:
        sync(readme, tmp_path)
    assert "README.md line 1" in str(exc.value)

"""Stage report_translate: the translator rows over seeds (mean ± std per variant, paired differences against
CUT-like and against attention with 95% Student-t intervals, and each run's diagnostics).

Reads ``<metrics-dir>/source_on_target.json`` and ``<metrics-dir>/translate_<variant>_s<S>.json`` (in dvc.yaml:
reports/metrics) and ``<diagnostics-dir>/seed<S>/<variant>_diagnostics.json`` (reports/translate); writes
``--out`` (markdown) and ``--json-out``. Every path is an option without default.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.reporting.translators import collect, render_translators
from vspa.utils import VspaError, run_stage, write_json_atomic, write_text_atomic


def main(
    seeds: str = typer.Option("0,1,2", help="Comma-separated translator seeds."),
    metrics_dir: Path = typer.Option(..., help="Folder of the metrics JSON files; in dvc.yaml: reports/metrics."),
    diagnostics_dir: Path = typer.Option(
        ..., help="Folder of seed<S>/<variant>_diagnostics.json; in dvc.yaml: reports/translate."
    ),
    out: Path = typer.Option(..., help="Markdown; in dvc.yaml: reports/translate/seeds.md."),
    json_out: Path = typer.Option(..., help="The summary as JSON; in dvc.yaml: reports/translate/seeds.json."),
) -> None:
    def body() -> None:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError as exc:
            raise VspaError(f"--seeds '{seeds}': give comma-separated integers, e.g. 0,1,2.") from exc
        if not seed_list:
            raise VspaError("--seeds is empty: give comma-separated integers, e.g. 0,1,2.")
        results, diagnostics = collect(metrics_dir, diagnostics_dir, seed_list)
        text, summary = render_translators(results, diagnostics)
        write_text_atomic(out, text)
        write_json_atomic(json_out, {"seeds": seed_list, **summary})
        typer.echo(f"wrote {out} and {json_out} ({len(seed_list)} seeds)")

    run_stage(body)


if __name__ == "__main__":
    typer.run(main)

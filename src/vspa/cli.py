"""The `vspa` command line: helpers around the pipeline (the stages themselves live in stages/)."""

from __future__ import annotations

from pathlib import Path

import typer

from vspa.utils import run_stage

app = typer.Typer(add_completion=False, no_args_is_help=True, help="vspa: visually similar pair alignment.")
memory_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect source memories (HDF5).")
app.add_typer(memory_app, name="memory")


@memory_app.command("inspect")
def memory_inspect(file: Path = typer.Argument(..., help="A memory file written by extract_memory or subsample.")):
    """Counts per class, feature dims and norms, and the file's attributes."""
    from vspa.memory.inspect import inspect_memory

    typer.echo(run_stage(inspect_memory, file))


@app.command("scenarios")
def scenarios():
    """List the scenario presets selectable with `-S scenario=NAME`."""
    from vspa.config import available_scenarios

    for name in available_scenarios():
        typer.echo(name)


if __name__ == "__main__":
    app()

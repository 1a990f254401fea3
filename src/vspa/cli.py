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


@app.command("params")
def params(
    overrides: list[str] = typer.Argument(None, help="Hydra overrides, e.g. scenario=sim10k_cityscapes adapt.tau=0.6."),
    conf: Path = typer.Option(Path("conf"), help="The Hydra config folder (config.yaml, scenario/)."),
    out: Path = typer.Option(Path("params.yaml"), help="Where the composed params go."),
    check: bool = typer.Option(False, help="Only check that --out equals the composition (exit 1 if not)."),
):
    """Compose conf/ (as `dvc exp run -S ...` does) and write params.yaml, or --check that it is up to date."""
    from vspa.config import compose, dump_params
    from vspa.utils import VspaError, write_text_atomic

    def body() -> None:
        text = dump_params(compose(conf, overrides or []))
        if check:
            if not out.is_file() or out.read_text() != text:
                raise VspaError(
                    f"{out} differs from the composition of {conf}/ with {overrides or []}: run "
                    f"`make params` (or `vspa params`) after editing conf/ or a scenario file."
                )
            typer.echo(f"{out}: up to date with {conf}/")
            return
        write_text_atomic(out, text)
        typer.echo(f"{out}: composed from {conf}/ with {overrides or []}")

    run_stage(body)


if __name__ == "__main__":
    app()

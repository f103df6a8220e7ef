"""The `dle-stream` command line: a thin typer shell over library functions."""

from __future__ import annotations

import typer

from dle_stream import __version__

app = typer.Typer(
    name="dle-stream",
    help="Live diffusion-coefficient estimation (µm²/s) for laser-scanning microscopes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dle-stream {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Live diffusion-coefficient estimation (µm²/s) for laser-scanning microscopes."""

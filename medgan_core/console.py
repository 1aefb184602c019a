"""What every ``medgan`` command shares: one console, one way to fail, long-lived child processes."""

from __future__ import annotations

import subprocess
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from medgan_core.errors import MedGANError

#: Text is printed as it is: paths, file names and sites' reasons often hold brackets, which
#: console markup would eat ("/out/[study]/x.dcm" printed as "/out//x.dcm") or fail on ("[/]").
#: A line that is styled says so (``markup=True``) and escapes what it did not write itself.
console = Console(soft_wrap=True, markup=False)


def fail(exc: MedGANError) -> NoReturn:
    """Bad input: one line, exit code 2, no traceback."""
    console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True)
    raise typer.Exit(code=2)


def run_foreground(command: list[str], env: dict[str, str]) -> NoReturn:
    """Run a long-lived Flower process in the foreground; Ctrl+C stops it cleanly."""
    process = subprocess.Popen(command, env=env)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        code = process.wait(timeout=30)
    raise typer.Exit(code=code)

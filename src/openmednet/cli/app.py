"""The ``openmednet`` command line: a Typer app whose commands live one per module.

Each command module defines ``register(app)``; commands only parse arguments, resolve a config and
call a ``run_*`` function of the library. Known user errors (``ValueError``, ``FileNotFoundError``,
``KeyError``) are printed as one red line with exit code 2 instead of a traceback; set
``OPENMEDNET_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler

COMMAND_MODULES = ("models", "corpus", "pretrain", "finetune", "study", "predict", "export", "serve", "quickstart")

app = typer.Typer(
    name="openmednet",
    help="MedNet: CNNs pre-trained on medical images. Build a corpus, pre-train, fine-tune, evaluate, use.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"openmednet.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"openmednet.cli.{name}":
                continue  # command not built yet
            raise
        module.register(app)


_register_commands()


def main() -> None:
    """Entry point of the ``openmednet`` script."""
    from openmednet.models import WeightsUnavailableError

    try:
        app()
    except (ValueError, FileNotFoundError, KeyError, WeightsUnavailableError) as e:
        if os.environ.get("OPENMEDNET_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        err_console.print(f"[bold red]error:[/] {msg}")
        sys.exit(2)


if __name__ == "__main__":
    main()

"""The ``openmednet`` command line: a Typer app whose commands live one per module.

Each command module defines ``register(app)``; commands only parse arguments, resolve a config and
call a ``run_*`` function of the library. Known user errors (``ValueError``, ``FileNotFoundError``,
``KeyError``, a ``SkipImage`` naming an unusable input file) and unusable paths (``OSError``
naming a file: ``--out`` that is a file, a read-only folder, a full disk) are printed as one red
line with exit code 2 instead of a traceback; set ``OPENMEDNET_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from typer.core import TyperGroup

COMMAND_MODULES = ("models", "corpus", "pretrain", "finetune", "study", "predict", "export", "serve", "quickstart")


class _NoEmptyArgs(TyperGroup):
    """Refuses an empty argument (``--data ""``, ``--unlabelled=``), almost always an unset shell
    variable: a path option turns it into ``Path("")``, which is ``.``, so ``finetune --data "$DATA"``
    trained on the working directory and ``--unlabelled "$UNL"`` took every image under it."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta["empty_arg"] = next((i for i, token in enumerate(args)
                                      if token == "" or (token.startswith("--") and token.endswith("="))), None)
        ctx.meta["args"] = list(args)
        return super().parse_args(ctx, args)


def _refuse_empty_args(ctx: typer.Context) -> None:
    """Raise the usage error for the empty argument ``_NoEmptyArgs`` found (from the root callback,
    where Typer reports it as a usage error: a short message, exit 2)."""
    i, args = ctx.meta.get("empty_arg"), ctx.meta.get("args", [])
    if i is None:
        return
    token = args[i]
    option = token[:-1] if token else (args[i - 1] if i and args[i - 1].startswith("-") else None)
    what = (f"{option} got an empty value" if option
            else f"the argument after '{args[i - 1]}' is empty" if i else "the first argument is empty")
    raise typer.BadParameter(f"{what} (an unset shell variable?): give a value or leave it out", ctx=ctx)


app = typer.Typer(
    cls=_NoEmptyArgs,
    name="openmednet",
    help="MedNet: CNNs pre-trained on medical images. Build a corpus, pre-train, fine-tune, evaluate, use.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root(ctx: typer.Context, verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs.")) -> None:
    _refuse_empty_args(ctx)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )


def _register_commands(target: typer.Typer, names: tuple[str, ...] = COMMAND_MODULES) -> None:
    """Import each command module and let it add its command to ``target``.

    A module that fails to import is an error, not a missing command: skipping it made
    ``openmednet predict`` answer "No such command" on a broken install, which points nowhere near
    the cause.

    Raises:
        ImportError: a command module is missing or fails to import (the message names the command
            and the fix; the original error is chained).
    """
    for name in names:
        try:
            module = importlib.import_module(f"openmednet.cli.{name}")
        except ImportError as e:
            raise ImportError(
                f"the '{name}' command could not be loaded ({type(e).__name__}: {e}); the installation is "
                f"broken or incomplete: reinstall with pip install -e . (or pip install --force-reinstall openmednet)"
            ) from e
        module.register(target)


_register_commands(app)


#: What to do about an OSError on a path the user gave, by errno.
_PATH_FIXES = {
    errno.EEXIST: "a file is where a folder is needed: give another path or move the file",
    errno.ENOTDIR: "a file is where a folder is needed: give another path or move the file",
    errno.EISDIR: "it is a folder: give a file path",
    errno.EACCES: "choose a location you can write to",
    errno.EPERM: "choose a location you can write to",
    errno.EROFS: "choose a location you can write to",
    errno.ENOSPC: "free some space or choose another disk",
}


def _path_error_message(e: OSError) -> str:
    """One line for an ``OSError`` on a named path: the path, the system's reason and the fix.

    ``os.replace`` errors carry the destination in ``filename2`` (``filename`` is a temporary file).
    """
    path = e.filename2 if e.filename2 is not None else e.filename
    fix = _PATH_FIXES.get(e.errno)
    return f"cannot use {os.fsdecode(path)}: {e.strerror}" + (f" ({fix})" if fix else "")


def main() -> None:
    """Entry point of the ``openmednet`` script."""
    from openmednet.data.readers import SkipImage
    from openmednet.models import WeightsUnavailableError

    try:
        app()
    # SkipImage escapes where a file is enumerated rather than read (a .npz --data without
    # MedMNIST keys): its message names the file and the reason.
    except (ValueError, FileNotFoundError, KeyError, WeightsUnavailableError, SkipImage) as e:
        if os.environ.get("OPENMEDNET_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        err_console.print(f"[bold red]error:[/] {escape(str(msg))}")  # "[scan.npz]" is text, not markup
        sys.exit(2)
    except OSError as e:
        # Only errors that name a path are the user's to fix; an OSError without one is a bug.
        if e.filename is None or os.environ.get("OPENMEDNET_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {escape(_path_error_message(e))}")
        sys.exit(2)


if __name__ == "__main__":
    main()

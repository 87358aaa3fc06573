"""The ``openmednet`` app: every command is registered, and a command that cannot load fails loudly."""

from __future__ import annotations

import sys

import pytest
import typer

from openmednet.cli.app import COMMAND_MODULES, _register_commands, app


def test_every_command_module_is_registered() -> None:
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert {"models", "corpus", "pretrain", "finetune", "study", "predict", "export", "serve", "quickstart"} <= names
    assert len(COMMAND_MODULES) == 9


def test_a_missing_command_module_is_an_error_not_a_missing_command() -> None:
    with pytest.raises(ImportError, match="the 'nosuch' command could not be loaded.*reinstall"):
        _register_commands(typer.Typer(), ("nosuch",))


def test_a_command_whose_import_fails_names_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import raise, as a module whose own imports fail does.
    monkeypatch.setitem(sys.modules, "openmednet.cli.broken", None)
    with pytest.raises(ImportError, match="'broken' command could not be loaded") as info:
        _register_commands(typer.Typer(), ("broken",))
    assert isinstance(info.value.__cause__, ImportError)

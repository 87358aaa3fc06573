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


@pytest.mark.parametrize("out, says", [("taken", "cannot use {tmp}/taken: File exists (a file is where a folder is needed"),
                                       ("taken/run", "cannot use {tmp}/taken/run: Not a directory")])
def test_an_out_path_under_a_file_is_one_line_with_exit_2(tmp_path, monkeypatch, capsys, out: str, says: str) -> None:
    # Regression: `finetune --out FILE` printed FileExistsError's traceback (exit 1).
    from openmednet.cli.app import main

    (tmp_path / "taken").write_text("an earlier file\n")
    (tmp_path / "data").mkdir()  # beside the --out path: an --out inside --data is refused for another reason
    argv = ["openmednet", "finetune", "--data", str(tmp_path / "data"), "--init", "scratch:mednet_test", "--out", str(tmp_path / out)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("OPENMEDNET_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main()
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and says.format(tmp=tmp_path) in err and "Traceback" not in err
    assert (tmp_path / "taken").read_text() == "an earlier file\n"


def test_os_errors_name_the_users_path_not_a_temporary_file() -> None:
    from openmednet.cli.app import _path_error_message

    replace = IsADirectoryError(21, "Is a directory", "/w/.preds.csv.x1.tmp", None, "preds.csv")
    assert _path_error_message(replace) == "cannot use preds.csv: Is a directory (it is a folder: give a file path)"
    assert _path_error_message(PermissionError(13, "Permission denied", "/ro/run")).endswith(
        "(choose a location you can write to)")


def test_an_unusable_npz_is_one_line_naming_the_file_in_brackets(tmp_path, monkeypatch, capsys) -> None:
    # Regression: SkipImage from listing a .npz without MedMNIST keys was a traceback, and rich
    # markup swallowed the "[bad.npz]" that names the file once it was printed.
    import numpy as np

    from openmednet.cli.app import main

    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 4)))
    monkeypatch.setattr(sys, "argv", ["openmednet", "finetune", "--data", str(tmp_path / "bad.npz"), "--init",
                                      "scratch:mednet_test", "--out", str(tmp_path / "run")])
    monkeypatch.delenv("OPENMEDNET_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main()
    err = "".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and "expectedMedMNISTkeys" in err and f"[{tmp_path / 'bad.npz'}]".replace(" ", "") in err


@pytest.mark.parametrize("args, says", [
    (["finetune", "--data", "", "--out", "x"], "--data got an empty value"),
    (["finetune", "--data=", "--out", "x"], "--data got an empty value"),
    (["finetune", "--data", "d", "--out", "x", "--semi", "fixmatch", "--unlabelled", ""], "--unlabelled got an empty"),
    (["predict", "run/model", ""], "the argument after 'run/model' is empty"),
])
def test_an_empty_argument_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch, args, says) -> None:
    # Regression: Path("") is ".": `finetune --unlabelled "$UNL"` with UNL unset took every image
    # under the working directory as unlabelled data, `predict run ""` predicted it, `--data ""`
    # trained on it. Nothing may be read or written.
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.translate(str.maketrans("│╭╮╰╯─", "      ")).split())  # rich's error box
    assert result.exit_code == 2 and says in text and "(an unset shell variable?)" in text, result.output
    assert list(tmp_path.iterdir()) == []

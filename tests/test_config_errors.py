"""A broken config is a ``ValueError`` naming the key or file, never a YAML or ``TypeError`` traceback.

Regression tests for ``openmednet study --config`` / ``finetune --set`` probes that printed tracebacks:
malformed YAML, an empty file, a target without ``data``, ``--set epochs=abc``, ``--set seeds=[0,``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from openmednet.cli.app import app
from openmednet.config import load_config
from openmednet.eval.finetune import FinetuneConfig
from openmednet.eval.study import StudyConfig

_STUDY = "out: {out}\ntargets: [{{name: a, data: {data}}}]\ninits: [scratch:mednet_test]\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "out: x\ntargets: [ {name: a\n")
    with pytest.raises(ValueError, match=r"study.yaml is not valid YAML: .* \(line 3, column 1\)"):
        load_config(StudyConfig, path)


def test_missing_required_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing required config key\(s\) out, targets of StudyConfig"):
        load_config(StudyConfig, _write(tmp_path, ""))
    study = load_config(StudyConfig, _write(tmp_path, "out: x\ntargets: [{name: a}]\n"))
    with pytest.raises(ValueError, match=r"missing required config key\(s\) targets.data of TargetSpec"):
        study.target_specs()


@pytest.mark.parametrize("override, says", [("epochs=abc", "config key 'epochs': expected an integer, got 'abc'"),
                                            ("per_class=true", "config key 'per_class': expected an integer, got True"),
                                            ("epochs=[0,", "override 'epochs=\\[0,': the value is not valid YAML")])
def test_bad_override_values_are_named(override: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        load_config(FinetuneConfig, None, ["data=d", "out=o", override])


def test_integral_numbers_and_nulls_still_load(tmp_path: Path) -> None:
    cfg = load_config(FinetuneConfig, None, ["data=d", "out=o", "epochs=1e1", "per_class=null", "image_size=32"])
    assert (cfg.epochs, cfg.per_class, cfg.image_size) == (10, None, 32) and type(cfg.epochs) is int
    study = load_config(StudyConfig, _write(tmp_path, _STUDY.format(out=tmp_path / "o", data=tmp_path)), ["seeds=[0,1]"])
    assert study.seeds == (0, 1)
    with pytest.raises(ValueError, match="config key 'seeds': expected an integer, got 'a'"):
        load_config(StudyConfig, tmp_path / "study.yaml", ["seeds=[a]"])


@pytest.mark.parametrize("args", [["study", "--config", "{bad}"], ["study", "--config", "{empty}"],
                                  ["finetune", "--data", "d", "--out", "o", "--set", "epochs=abc"]])
def test_the_cli_gets_a_value_error_not_a_traceback(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "bad.yaml").write_text("targets: [ {name: a\n")
    (tmp_path / "empty.yaml").write_text("")
    args = [a.format(bad=tmp_path / "bad.yaml", empty=tmp_path / "empty.yaml") for a in args]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ValueError), result.exception  # app.main prints it as one line, exit 2


@pytest.mark.parametrize("override, says", [("semi=freematch", "config key 'semi': expected a list, got 'freematch': write \\[freematch\\]"),
                                            ("seeds=0", "config key 'seeds': expected a list, got 0: write \\[0\\]"),
                                            ("inits=auto", "config key 'inits': expected a list, got 'auto'")])
def test_a_scalar_for_a_list_is_refused_not_iterated(tmp_path: Path, override: str, says: str) -> None:
    # Regression (hostile-user probe): "semi: freematch" was iterated letter by letter ("semi repeats
    # ['e']"), "seeds: 0" was a TypeError traceback, and "unlabelled: DIR" read the folders D, I, R
    # (a leading "/" listed the whole disk).
    study = _write(tmp_path, _STUDY.format(out=tmp_path / "o", data=tmp_path))
    with pytest.raises(ValueError, match=says):
        load_config(StudyConfig, study, [override])
    with pytest.raises(ValueError, match="config key 'unlabelled': expected a list, got 'u': write \\[u\\]"):
        load_config(FinetuneConfig, None, ["data=d", "out=o", "semi=fixmatch", "unlabelled=u"])
    with pytest.raises(ValueError, match="config key 'targets.classes': expected a list"):  # an optional tuple too
        StudyConfig(out=tmp_path, targets=({"name": "a", "data": str(tmp_path), "classes": "no"},)).target_specs()
    assert load_config(FinetuneConfig, None, ["data=d", "out=o", "semi=fixmatch", "unlabelled=[u]"]).unlabelled == ("u",)
    # The Python API, which skips from_dict, refuses them too.
    with pytest.raises(ValueError, match="unlabelled must be a sequence of sources, got 'u'"):
        FinetuneConfig(data=Path("d"), out=Path("o"), semi="fixmatch", unlabelled="u")
    from openmednet.eval.study import _check_grid

    with pytest.raises(ValueError, match="semi must be a list, got 'freematch'"):
        _check_grid(StudyConfig(out=tmp_path, targets=(), semi="freematch", unlabelled=("rest_of_train",)))

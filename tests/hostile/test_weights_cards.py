"""Issue 14, weights and model cards: cards edited by hand or by an attacker, and reproducible saves.

Every case starts from a real model saved with ``save_pretrained`` and edits its card (or weights)
the way the probe did; loading, shipping and ``openmednet models card`` must all refuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from openmednet.cli.app import app
from openmednet.models import (
    _registry,
    create_model,
    load_pretrained,
    read_model_card,
    register_shipped_weights,
    save_pretrained,
)
from openmednet.models._weights import CARD_FILE, WEIGHTS_FILE
from openmednet.utils import sha256_file

runner = CliRunner()


def _save(folder: Path, in_chans: int = 1, num_classes: int = 3, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_pretrained(create_model("mednet_test", in_chans=in_chans, num_classes=num_classes).eval(), folder,
                    label_names=tuple("abc"[:num_classes]) if num_classes else None)
    return folder


def _edit(folder: Path, **changes) -> None:
    """Rewrite ``folder``'s card: ``section__key=value`` changes one nested field."""
    path = folder / CARD_FILE
    card = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = card
        *parents, key = dotted.split("__")
        for parent in parents:
            node = node[parent]
        node[key] = value
    path.write_text(json.dumps(card))


def _card_cli(folder: Path):
    return runner.invoke(app, ["models", "card", str(folder)])


@pytest.fixture
def isolated_registry(monkeypatch):
    _registry.list_pretrained_cfgs()  # run the deferred registration of the package's cards first
    cfgs = {arch: dict(tags) for arch, tags in _registry._model_pretrained_cfgs.items()}
    monkeypatch.setattr(_registry, "_model_pretrained_cfgs", cfgs)
    monkeypatch.setattr(_registry, "_model_default_tag", dict(_registry._model_default_tag))


# --------------------------------------------------------------------------------- weights.file
@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_gray_card_cannot_point_at_colour_weights_outside_its_folder(tmp_path, where):
    gray, color = _save(tmp_path / "gray"), _save(tmp_path / "color", in_chans=3)
    target = color / WEIGHTS_FILE
    _edit(gray, weights__file="../color/model.safetensors" if where == "relative" else str(target),
          weights__sha256=sha256_file(target))
    with pytest.raises(ValueError, match="not a file name in the card's folder"):
        load_pretrained(gray)
    result = _card_cli(gray)
    assert isinstance(result.exception, ValueError) and "verified" not in result.output


def test_shipped_card_cannot_point_outside_the_weights_folder(tmp_path, isolated_registry):
    torch.manual_seed(0)
    model = create_model("mednet_test", num_classes=2)
    shipped = tmp_path / "shipped"
    save_pretrained(model, shipped, tag="evil_v1")
    save_pretrained(model, tmp_path, tag="outside")
    card_path = shipped / "mednet_test.evil_v1.json"
    card = json.loads(card_path.read_text())
    card["weights"]["file"] = "../mednet_test.outside.safetensors"
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="not a file name"):
        register_shipped_weights(shipped)
    with pytest.warns(UserWarning, match="skipping shipped weights"):
        assert register_shipped_weights(shipped, strict=False) == []


def test_fingerprint_file_cannot_escape_either(tmp_path):
    folder = _save(tmp_path / "m")
    card = json.loads((folder / CARD_FILE).read_text())
    card["provenance"]["corpus_fingerprint"] = {"file": "/etc/passwd", "sha256": "0" * 64}
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="corpus_fingerprint.file '/etc/passwd' is not a file name"):
        read_model_card(folder)


# --------------------------------------------------------------------------------- card vs architecture
def test_card_claiming_7_input_channels_is_refused_not_adapted(tmp_path):
    folder = _save(tmp_path / "m")
    _edit(folder, input__channels=7, input__mean=[0.5] * 7, input__std=[0.25] * 7)
    with pytest.raises(ValueError, match=r"contradicts the card's input.channels=7"):
        load_pretrained(folder)
    # Both places changed consistently: the weights' first conv still has 1 channel.
    _edit(folder, model_args__in_chans=7)
    with pytest.raises(ValueError, match=r"does not describe model.safetensors.*stem"):
        load_pretrained(folder)
    result = _card_cli(folder)
    assert isinstance(result.exception, ValueError) and "verified" not in result.output


def test_card_num_classes_is_checked_against_the_head(tmp_path):
    folder = _save(tmp_path / "m", num_classes=3)
    _edit(folder, head__num_classes=5, head__label_names=list("abcde"), model_args__num_classes=5)
    with pytest.raises(ValueError, match=r"does not describe model.safetensors.*head"):
        load_pretrained(folder)
    _edit(folder, head__num_classes=3, model_args__num_classes=3, head__label_names=["x", "y"])
    with pytest.raises(ValueError, match="2 label_names for head.num_classes=3"):
        load_pretrained(folder)
    # The honest card still loads, and asking for another head is still possible.
    _edit(folder, head__label_names=list("abc"))
    assert load_pretrained(folder, num_classes=5).head.fc.out_features == 5


def test_unknown_architecture_is_refused(tmp_path):
    folder = _save(tmp_path / "m")
    _edit(folder, architecture="mednet_tset")
    with pytest.raises(KeyError, match="did you mean 'mednet_test'"):
        load_pretrained(folder)
    result = _card_cli(folder)
    assert isinstance(result.exception, KeyError) and "verified" not in result.output


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_args__bogus": 1}, "does not accept the card's model_args"),
        ({"architecture": "resnet18"}, "does not accept the card's model_args"),  # MedNet's width_mult
        ({"model_args__width_mult": 0.5}, "does not describe"),  # builds, but not these weights
    ],
)
def test_architecture_argument_mismatch_is_a_clear_error_not_a_type_error(tmp_path, changes, message):
    folder = _save(tmp_path / "m")
    _edit(folder, **changes)
    with pytest.raises(ValueError, match=message):
        load_pretrained(folder)


def test_num_params_must_match(tmp_path):
    folder = _save(tmp_path / "m")
    _edit(folder, weights__num_params=1)
    with pytest.raises(ValueError, match="weights.num_params is 1"):
        load_pretrained(folder)


# --------------------------------------------------------------------------------- weights content
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, value):
    torch.manual_seed(0)
    model = create_model("mednet_test", num_classes=2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    save_pretrained(model, tmp_path)  # checksum is right: only the values are wrong
    with pytest.raises(ValueError, match="NaN or inf values"):
        load_pretrained(tmp_path)
    result = _card_cli(tmp_path)
    assert isinstance(result.exception, ValueError) and "verified" not in result.output


def test_one_nan_in_a_batchnorm_buffer_is_enough(tmp_path):
    torch.manual_seed(0)
    model = create_model("mednet_test", num_classes=2)
    model.stem.conv1.bn.running_var[0] = float("nan")
    save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match=r"1 tensors hold NaN or inf values \(1 of .*running_var"):
        load_pretrained(tmp_path)


def test_models_card_refuses_a_pickle_payload_with_a_matching_checksum(tmp_path):
    folder = _save(tmp_path / "m")
    weights = folder / WEIGHTS_FILE
    torch.save(create_model("mednet_test", num_classes=3).state_dict(), weights)
    _edit(folder, weights__sha256=sha256_file(weights))
    result = _card_cli(folder)
    assert isinstance(result.exception, ValueError) and "pickle" in str(result.exception)
    assert "verified" not in result.output
    # The installed command: one red line and a non-zero exit code.
    proc = subprocess.run([sys.executable, "-m", "openmednet", "models", "card", str(folder)],
                          capture_output=True, text=True, timeout=600)  # a loaded 2-core CI box
    assert proc.returncode == 2 and "pickle" in proc.stderr and "verified" not in proc.stdout


def test_models_card_still_verifies_an_honest_card(tmp_path):
    folder = _save(tmp_path / "m")
    result = _card_cli(folder)
    assert result.exit_code == 0, result.output
    assert "verified" in result.output


# --------------------------------------------------------------------------------- reproducible bytes
_SAVE = """
import sys, torch
from openmednet.models import create_model, save_pretrained
torch.manual_seed(0)
model = create_model("mednet_test", num_classes=2)
for i in range(4):
    save_pretrained(model, f"{sys.argv[1]}/{i}")
"""


def test_identical_saves_are_identical_bytes_across_processes(tmp_path):
    """Same weights, same file: the card's sha256 identifies weights (the header once varied)."""
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path / seed)], env=env, check=True, timeout=600)
    files = sorted(tmp_path.glob("*/*/model.safetensors"))
    assert len(files) == 8
    digests = {hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert len(digests) == 1, digests
    # The rewritten header is still a valid safetensors file with the metadata.
    from safetensors import safe_open

    with safe_open(files[0], "pt") as f:
        assert f.metadata() == {"architecture": "mednet_test", "format": "pt"}
    assert json.loads((files[0].parent / CARD_FILE).read_text())["weights"]["sha256"] == digests.pop()


# --------------------------------------------------------------------------------- shipped licences
def test_shipped_licences_name_only_data_the_weights_were_trained_on():
    """The gray card's licence named HAM10000 (a colour dataset): a licence line copied across cards.

    Every dataset name (any shipped card's sources, and the pre-training folders of ../shared/data
    when present) that a card's licence mentions must be in that card's own data.
    """
    from importlib.resources import files

    shared = Path(os.environ.get("OPENMEDNET_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    cards = [read_model_card(Path(str(p))) for p in (files("openmednet") / "assets" / "weights").iterdir()
             if p.name.endswith(".json")]
    assert {c.architecture for c in cards} == {"mednet_gray", "mednet_color"}
    names = {name for c in cards for name in c.data}
    names |= {p.name for family in ("gray", "color") for p in (shared / family / "pretrain").glob("*/")}
    for card in cards:
        named = {n for n in names if n.lower() in card.license.lower()}
        assert named <= set(card.data), f"{card.architecture}.{card.tag} licence names {named - set(card.data)}"
    gray = next(c for c in cards if c.architecture == "mednet_gray")
    assert "HAM10000" not in gray.license and "knee_oa" in gray.license

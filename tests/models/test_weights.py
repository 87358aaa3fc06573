"""Weights I/O: save/load round trip, model cards, bad files, 1<->3 channel and head adaptation.

Images are real chest X-ray pixels from ../shared/data (gray, scaled to [0, 1] then normalised as
the model card says); models are the tiny ``mednet_test`` and, for timm, ``resnet18`` at 32-48 px.
"""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import openmednet
from openmednet.cli.app import app
from openmednet.models import (
    ModelCard,
    _registry,
    adapt_input_conv,
    create_model,
    load_pretrained,
    load_weights,
    read_model_card,
    register_shipped_weights,
    save_pretrained,
)
from openmednet.models._builder import package_weights_dir
from openmednet.utils import sha256_file

XRAY = "gray/pretrain/chest_xray_pneumonia/original_subset/NORMAL/IM-0117-0001.jpg"


@pytest.fixture(scope="module")
def xray(shared_data) -> torch.Tensor:
    """A real chest X-ray, gray, 48x48, normalised with MedNet's gray contract: ``(2, 1, 48, 48)``.

    The second image is the first flipped, so batches have two different real images.
    """
    img = Image.open(shared_data / XRAY).convert("L").resize((48, 48), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]
    x = (x - 0.5) / 0.25
    return torch.cat([x, x.flip(-1)])


@pytest.fixture
def saved(tmp_path):
    """A trained-looking ``mednet_test`` (random BN statistics, so eval mode is non-trivial), saved."""
    torch.manual_seed(0)
    model = create_model("mednet_test", num_classes=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    card = save_pretrained(model, tmp_path, data=("chest_xray_pneumonia",), objective="supervised",
                           epochs=3, metrics={"val_auroc": 0.91}, label_names=("a", "b", "c"))
    return model, card, tmp_path


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registered weight sets restored after the test (shipped-weight tests register their own)."""
    _registry.list_pretrained_cfgs()  # run the deferred registration of the package's cards first
    cfgs = {arch: dict(tags) for arch, tags in _registry._model_pretrained_cfgs.items()}
    monkeypatch.setattr(_registry, "_model_pretrained_cfgs", cfgs)
    monkeypatch.setattr(_registry, "_model_default_tag", dict(_registry._model_default_tag))


# --------------------------------------------------------------------------------- round trip
def test_round_trip_is_exact(saved, xray):
    model, card, path = saved
    loaded = load_pretrained(path).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(model(xray), loaded(xray))
    assert loaded.pretrained_cfg.label_names == ("a", "b", "c")
    assert loaded.pretrained_cfg.sha256 == card.sha256


def test_relative_paths_load(saved, monkeypatch, xray):
    model, _, path = saved
    monkeypatch.chdir(path.parent)
    with torch.no_grad():
        assert torch.equal(load_pretrained(path.name).eval()(xray), model(xray))
        bare = create_model("mednet_test", pretrained_file=f"{path.name}/model.safetensors", num_classes=3)
        assert torch.equal(bare.eval()(xray), model(xray))


def test_model_card_records_contract_provenance_and_checksum(saved):
    model, card, path = saved
    data = json.loads((path / "model_card.json").read_text())
    assert data["version"] == 1
    assert data["architecture"] == "mednet_test"
    assert data["model_args"]["width_mult"] == 0.25 and data["model_args"]["num_classes"] == 3
    assert data["weights"]["sha256"] == sha256_file(path / "model.safetensors")
    assert data["weights"]["num_params"] == sum(p.numel() for p in model.parameters())
    assert data["input"] == {"channels": 1, "size": [64, 64], "min_size": [17, 17], "mean": [0.5], "std": [0.25],
                             "intensity": "uint8/255", "interpolation": "bilinear"}
    assert data["head"]["num_classes"] == 3 and data["head"]["label_names"] == ["a", "b", "c"]
    assert data["provenance"]["data"] == ["chest_xray_pneumonia"] and data["provenance"]["epochs"] == 3
    assert data["metrics"] == {"val_auroc": 0.91}
    assert read_model_card(path) == card == ModelCard.from_dict(card.to_dict())


def test_unsupported_card_version_is_refused(saved):
    _, card, path = saved
    data = card.to_dict() | {"version": 99}
    (path / "model_card.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 99 is not supported"):
        read_model_card(path)


# --------------------------------------------------------------------------------- bad files
def test_tampered_weights_fail_the_checksum(saved):
    _, card, path = saved
    weights = path / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF  # one byte of tensor data: still a valid safetensors file
    weights.write_bytes(bytes(blob))
    assert load_weights(weights).keys()  # parses fine: only the checksum can tell
    with pytest.raises(ValueError, match="checksum mismatch.*modified"):
        load_pretrained(path)


def test_truncated_weights_are_named_as_such(saved):
    _, _, path = saved
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_pretrained(path)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_weights(weights)
    weights.write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="truncated"):
        load_weights(weights)


def test_corrupted_header_is_named(saved):
    _, _, path = saved
    weights = path / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[8] = ord("[")  # the JSON header must be an object
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="neither a safetensors file"):
        load_weights(weights)


def test_safetensors_header_length_starting_with_0x80_is_not_a_pickle(tmp_path):
    # The first byte of a safetensors file is the low byte of its header length; 0x80 is also the
    # pickle protocol marker. 384 = 0x180 (safetensors pads headers with spaces to 8 bytes).
    values = torch.tensor([1.5, -2.25])
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 384) + header.ljust(384) + values.numpy().tobytes())
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(load_weights(path)["w"], values)


def test_pickle_refused_unless_allowed(saved, tmp_path, xray):
    model, _, _ = saved
    pth = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.state_dict()}, pth)
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        load_weights(pth)
    with pytest.raises(ValueError, match="pickle"):
        create_model("mednet_test", pretrained_file=pth, num_classes=3)
    loaded = create_model("mednet_test", pretrained_file=pth, allow_pickle=True, num_classes=3).eval()
    with torch.no_grad():
        assert torch.equal(loaded(xray), model(xray))


class _NotATensor:
    pass


def test_pickle_with_code_objects_is_refused_even_when_allowed(tmp_path):
    pth = tmp_path / "evil.pth"
    pth.write_bytes(pickle.dumps({"w": _NotATensor()}, protocol=2))
    with pytest.raises(ValueError, match="objects other than tensors"):
        load_weights(pth, allow_pickle=True)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="model card not found"):
        load_pretrained(tmp_path / "nope")


def test_weights_of_another_width_do_not_fit(saved):
    _, _, path = saved
    with pytest.raises(ValueError, match="shape mismatch.*model_args"):
        create_model("mednet_test", pretrained_file=path / "model.safetensors", width_mult=0.5, num_classes=3)


def test_card_of_another_architecture_is_refused(saved):
    _, _, path = saved
    with pytest.raises(ValueError, match="holds 'mednet_test' weights, not 'mednet_gray'"):
        create_model("mednet_gray", pretrained_file=path)


# --------------------------------------------------------------------------------- head
def test_new_head_keeps_the_backbone(saved, xray):
    model, _, path = saved
    new = load_pretrained(path, num_classes=5).eval()
    assert new.head.fc.out_features == 5
    assert torch.equal(new.head.fc1.weight, model.head.fc1.weight)  # hidden FC is pretrained too
    with torch.no_grad():
        assert torch.equal(new.forward_features(xray), model.forward_features(xray))
        assert new(xray).shape == (2, 5)
    assert new.pretrained_cfg.num_classes == 5 and new.pretrained_cfg.label_names == ()


def test_num_classes_zero_gives_the_pretrained_pooled_features(saved, xray):
    model, _, path = saved
    feats = load_pretrained(path, num_classes=0).eval()
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(xray), pre_logits=True)
        assert torch.equal(feats(xray), expected)


# --------------------------------------------------------------------------------- channels
def test_adapt_input_conv_follows_timm_rules():
    w3 = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3, 3)
    assert torch.equal(adapt_input_conv(1, w3), w3.sum(1, keepdim=True))
    w1 = w3[:, :1]
    # timm scales by multiplying with 1/3, so the last bit may differ from dividing by 3.
    torch.testing.assert_close(adapt_input_conv(3, w1), w1.repeat(1, 3, 1, 1) / 3, rtol=2e-7, atol=0)
    assert adapt_input_conv(3, w3) is w3
    w2 = w3[:, :2]
    torch.testing.assert_close(adapt_input_conv(3, w2), torch.cat([w2, w2[:, :1]], 1) * 2 / 3, rtol=2e-7, atol=0)
    with pytest.raises(ValueError, match=r"shape \(2, 3\) .* expected a 4-D"):
        adapt_input_conv(1, torch.ones(2, 3))


def _gray_equals_repeated(name, tmp_path, x_gray, **kwargs):
    """Save a 3-channel model; its 1-channel adaptation on gray x must equal it on x repeated."""
    torch.manual_seed(1)
    color = create_model(name, in_chans=3, num_classes=4, **kwargs).eval()
    save_pretrained(color, tmp_path)
    gray = load_pretrained(tmp_path, in_chans=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(gray(x_gray), color(x_gray.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    assert gray.pretrained_cfg.input_size[0] == 1
    return color, gray


def test_mednet_3_to_1_channel_is_exact(tmp_path, xray):
    _gray_equals_repeated("mednet_test", tmp_path, xray)


def test_mednet_1_to_3_channel_is_exact(saved, xray):
    model, _, path = saved
    color = load_pretrained(path, in_chans=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(color(xray.expand(-1, 3, -1, -1)), model(xray), rtol=1e-5, atol=1e-5)


def test_timm_model_3_to_1_channel_is_exact(tmp_path, xray):
    _, gray = _gray_equals_repeated("resnet18", tmp_path, xray)
    card = save_pretrained(gray, tmp_path / "gray")  # the card describes the adapted model
    assert card.model_args == {"in_chans": 1, "num_classes": 4} and card.input_size[0] == 1
    assert load_pretrained(tmp_path / "gray").conv1.in_channels == 1


# --------------------------------------------------------------------------------- shipped weights
def test_shipped_weights_load_offline_by_default_tag(tmp_path, monkeypatch, isolated_registry, xray):
    torch.manual_seed(2)
    model = create_model("mednet_gray", width_mult=0.25, num_classes=2).eval()
    save_pretrained(model, tmp_path, tag="unit_v1", default=True, objective="supervised")
    save_pretrained(create_model("mednet_gray", width_mult=0.25, num_classes=2), tmp_path, tag="unit_v0")
    monkeypatch.setenv("OPENMEDNET_WEIGHTS_DIR", str(tmp_path))
    assert package_weights_dir() == tmp_path
    assert register_shipped_weights() == ["mednet_gray.unit_v0", "mednet_gray.unit_v1"]
    assert "mednet_gray.unit_v1" in openmednet.list_models("mednet_gray*", pretrained=True)

    loaded = create_model("mednet_gray", pretrained=True).eval()  # width_mult comes from the card
    assert loaded.pretrained_cfg.source == "package" and loaded.pretrained_cfg.meta["tag"] == "unit_v1"
    with torch.no_grad():
        assert torch.equal(loaded(xray), model(xray))
    other = create_model("mednet_gray.unit_v0", num_classes=7)
    assert other.head.fc.out_features == 7

    weights = tmp_path / "mednet_gray.unit_v1.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="checksum mismatch"):
        create_model("mednet_gray", pretrained=True)


def test_shipped_cards_are_validated(tmp_path, isolated_registry):
    model = create_model("mednet_test")
    save_pretrained(model, tmp_path, tag="a", default=True)
    save_pretrained(model, tmp_path, tag="b", default=True)
    with pytest.raises(ValueError, match="only one card per architecture"):
        register_shipped_weights(tmp_path)

    bad = tmp_path / "bad"
    save_pretrained(model, bad, tag="x")
    (bad / "mednet_test.x.json").rename(bad / "renamed.json")
    with pytest.raises(ValueError, match="must be named '<arch>.<tag>.json'"):
        register_shipped_weights(bad)
    with pytest.warns(UserWarning, match="skipping shipped weights renamed.json"):
        assert register_shipped_weights(bad, strict=False) == []


def test_no_weights_registered_is_a_clear_error():
    with pytest.raises(KeyError, match="no pretrained weights registered.*pretrained_file"):
        create_model("mednet_test", pretrained=True)


# --------------------------------------------------------------------------------- CLI
def test_cli_models_card_verifies_checksum(saved):
    _, card, path = saved
    result = CliRunner().invoke(app, ["models", "card", str(path)])
    assert result.exit_code == 0, result.output
    assert "mednet_test" in result.output and "verified" in result.output and "val_auroc" in result.output

    weights = path / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    result = CliRunner().invoke(app, ["models", "card", str(path)])
    assert isinstance(result.exception, ValueError) and "checksum mismatch" in str(result.exception)

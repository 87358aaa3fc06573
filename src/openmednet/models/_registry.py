"""Model registry: ``register_model``, ``create_model``, ``list_models``.

Names follow timm: an architecture (``mednet_gray``) optionally followed by a weight tag
(``mednet_gray.ssl_simclr_v1``). The registries here are the only module-level mutable state in
OpenMedNet. Registering a name twice is an error, not a warning (a silently replaced model is a bug).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

from openmednet._errors import did_you_mean
from openmednet.models._pretrained import PretrainedCfg

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}
_model_pretrained_cfgs: dict[str, dict[str, PretrainedCfg]] = {}
_model_default_tag: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model entrypoint under its function name.

    Raises:
        ValueError: a model of that name is already registered.
    """
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"model '{name}' is already registered ({_model_entrypoints[name].__module__})")
    _model_entrypoints[name] = fn
    return fn


def register_pretrained_cfgs(arch: str, cfgs: dict[str, PretrainedCfg], default: str | None = None) -> None:
    """Register the weight sets (``tag -> PretrainedCfg``) of ``arch``; the first is the default."""
    existing = _model_pretrained_cfgs.setdefault(arch, {})
    for tag, cfg in cfgs.items():
        if tag in existing:
            raise ValueError(f"pretrained cfg '{arch}.{tag}' is already registered")
        existing[tag] = cfg
    if default is not None:
        _model_default_tag[arch] = default
    elif arch not in _model_default_tag and cfgs:
        _model_default_tag[arch] = next(iter(cfgs))


def split_model_name(name: str) -> tuple[str, str | None]:
    """``"mednet_gray.sup_v1"`` -> ``("mednet_gray", "sup_v1")``; no tag -> ``(name, None)``."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def is_model(name: str) -> bool:
    """Whether ``name`` (with or without a tag) names a registered architecture."""
    return split_model_name(name)[0] in _model_entrypoints


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The registered constructor of architecture ``name``; ``KeyError`` with a suggestion if unknown."""
    arch, _ = split_model_name(name)
    if arch not in _model_entrypoints:
        raise KeyError(
            f"unknown model '{arch}'{did_you_mean(arch, _model_entrypoints)} "
            f"(see openmednet.list_models() or `openmednet models list`)"
        )
    return _model_entrypoints[arch]


def get_pretrained_cfg(name: str, allow_missing: bool = True) -> PretrainedCfg | None:
    """The ``PretrainedCfg`` for ``arch`` or ``arch.tag`` (default tag when none is given).

    Returns ``None`` when the architecture has no weight sets and ``allow_missing`` is true.
    """
    arch, tag = split_model_name(name)
    model_entrypoint(arch)  # raises on unknown architectures
    cfgs = _model_pretrained_cfgs.get(arch, {})
    if tag is None:
        tag = _model_default_tag.get(arch)
        if tag is None:
            if allow_missing:
                return None
            raise KeyError(f"model '{arch}' has no pretrained weights registered")
    if tag not in cfgs:
        raise KeyError(
            f"unknown weights '{arch}.{tag}'{did_you_mean(tag, cfgs)} "
            f"(available: {', '.join(f'{arch}.{t}' for t in cfgs) or 'none'})"
        )
    return cfgs[tag]


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered names matching a shell pattern.

    Args:
        pattern: ``fnmatch`` pattern, e.g. ``"mednet_*"``.
        pretrained: list ``arch.tag`` names of weight sets instead of architectures.
    """
    if pretrained:
        names = [f"{a}.{t}" for a, cfgs in _model_pretrained_cfgs.items() for t in cfgs]
    else:
        names = list(_model_entrypoints)
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def list_pretrained_cfgs() -> dict[str, PretrainedCfg]:
    """All weight sets as ``{"arch.tag": PretrainedCfg}``."""
    return {f"{a}.{t}": c for a, cfgs in _model_pretrained_cfgs.items() for t, c in cfgs.items()}


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, optionally with its pretrained weights.

    Args:
        name: architecture (``"mednet_gray"``) or weight set (``"mednet_gray.sup_v1"``); a weight
            set name implies ``pretrained=True``.
        pretrained: load the default (or named) weight set; fails with a clear message offline when
            the weights would need a download.
        num_classes: classifier outputs; ``0`` gives pooled features. When it differs from the
            weights' head, the head is re-initialised.
        in_chans: input channels; pretrained first convs are adapted between 1 and 3 channels.
        **kwargs: architecture arguments (``width_mult``, ``drop_rate``...); ``None`` values are
            dropped so callers can pass optional CLI values straight through. Two more are
            handled by the builder: ``pretrained_file`` (local weights: a safetensors file, or a
            ``save_pretrained`` directory / card, checksum verified) and ``allow_pickle`` (accept
            a trusted ``torch.save`` file, read with ``weights_only=True``).

    Returns:
        The model in train mode, with ``model.pretrained_cfg`` set.

    Raises:
        KeyError: unknown name or weight set (with a suggestion).
        ValueError: weights corrupt, tampered, pickled without consent, or not fitting.
        openmednet.models.WeightsUnavailableError: weights need a download that cannot be made.
    """
    from openmednet.models._builder import build_model

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    arch, tag = split_model_name(name)
    return build_model(
        arch,
        model_entrypoint(arch),
        tag=tag,
        pretrained=pretrained or tag is not None,
        num_classes=num_classes,
        in_chans=in_chans,
        **kwargs,
    )

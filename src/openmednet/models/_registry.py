"""Model registry: ``register_model``, ``register_pretrained_cfgs``, lookups and ``list_models``.

Names follow timm: an architecture (``mednet_gray``) optionally followed by a weight tag
(``mednet_gray.ssl_simclr_v1``). The registries here are the only module-level mutable state in
OpenMedNet. Registering a name twice is an error, not a warning (a silently replaced model is a bug).

This module only holds names; it imports no other model module. Building a model is
``_factory.create_model`` (as in timm: ``_registry`` <- ``_builder`` <- ``_factory``).

Weight sets that need files read to be known (the shipped model cards) are registered lazily:
``defer_pretrained_cfgs(fn)`` queues ``fn``, and the first lookup of weight sets
(``get_pretrained_cfg``, ``list_models(pretrained=True)``, ``list_pretrained_cfgs``) runs it, so
``import openmednet`` reads no file and no environment variable.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable

from torch import nn

from openmednet._errors import did_you_mean
from openmednet.models._pretrained import PretrainedCfg

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}
_model_pretrained_cfgs: dict[str, dict[str, PretrainedCfg]] = {}
_model_default_tag: dict[str, str] = {}
_deferred: list[Callable[[], object]] = []
_deferred_lock = threading.RLock()


def defer_pretrained_cfgs(fn: Callable[[], object]) -> None:
    """Queue ``fn`` (which registers weight sets) to run at the first lookup of weight sets."""
    _deferred.append(fn)


def _run_deferred() -> None:
    """Run the queued registrations once, in order (each is taken off the queue before it runs, so
    a lookup made by a registration itself does not run it again).

    Every lookup takes the lock (re-entrant), so a concurrent first lookup waits until the
    registrations are complete instead of seeing an empty queue while one still runs; a
    registration that raises goes back on the queue for the next lookup.
    """
    with _deferred_lock:
        while _deferred:
            fn = _deferred.pop(0)
            try:
                fn()
            except BaseException:
                _deferred.insert(0, fn)
                raise


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
    _run_deferred()
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
        _run_deferred()
        names = [f"{a}.{t}" for a, cfgs in _model_pretrained_cfgs.items() for t in cfgs]
    else:
        names = list(_model_entrypoints)
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def list_pretrained_cfgs() -> dict[str, PretrainedCfg]:
    """All weight sets as ``{"arch.tag": PretrainedCfg}``."""
    _run_deferred()
    return {f"{a}.{t}": c for a, cfgs in _model_pretrained_cfgs.items() for t, c in cfgs.items()}


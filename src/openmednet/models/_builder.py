"""``build_model``: the only place where a model is constructed together with its weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def build_model(
    arch: str,
    entrypoint: Callable[..., nn.Module],
    *,
    tag: str | None,
    pretrained: bool,
    num_classes: int | None,
    in_chans: int | None,
    **kwargs: Any,
) -> nn.Module:
    """Construct ``arch`` and, if ``pretrained``, load its weights (adapting input conv and head)."""
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if pretrained:
        raise NotImplementedError("pretrained loading is being implemented (issue 2)")
    return entrypoint(**kwargs)

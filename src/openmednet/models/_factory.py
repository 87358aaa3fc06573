"""``create_model`` and ``load_pretrained``: the public way to build a model (as timm's ``_factory``).

Imports go one way inside ``openmednet.models``: ``_registry`` (names) <- ``_builder`` (a model with
its weights) <- ``_factory`` (this module: name parsing, ``features_only``). Nothing here is
imported back by the modules below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from openmednet.models._builder import build_model
from openmednet.models._card import read_model_card
from openmednet.models._features import to_features
from openmednet.models._registry import model_entrypoint, split_model_name

__all__ = ["create_model", "load_pretrained"]


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
    *,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    output_stride: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, optionally with its pretrained weights.

    Args:
        name: architecture (``"mednet_gray"``) or weight set (``"mednet_gray.sup_v1"``); a weight
            set name implies ``pretrained=True``.
        pretrained: load the default (or named) weight set; fails with a clear message offline when
            the weights would need a download.
        num_classes: classifier outputs; ``0`` gives pooled features. When it differs from the
            weights' head, the head is re-initialised. Ignored with ``features_only``.
        in_chans: input channels; pretrained first convs are adapted between 1 and 3 channels.
        features_only: return the multi-scale feature extractor instead of the classifier (timm's
            contract: ``forward`` gives a list of ``(B, C_i, H_i, W_i)`` maps, ``feature_info``
            their ``.channels()`` / ``.reduction()`` / ``.module_name()``; see ``_features.py``).
        out_indices: feature levels to return. MedNet: 0-3 = stages 1-4 (reductions 2, 4, 8, 16,
            the default), 4 = stage 4 average-pooled to stride 32; baselines: timm's levels.
        output_stride: MedNet: 32 (default) or 16 (level 4 = stage 4 unpooled); baselines: timm's
            dilation.
        **kwargs: architecture arguments (``width_mult``, ``drop_rate``...); ``None`` values are
            dropped so callers can pass optional CLI values straight through. Two more are
            handled by the builder: ``pretrained_file`` (local weights: a safetensors file, or a
            ``save_pretrained`` directory / card, checksum verified) and ``allow_pickle`` (accept
            a trusted ``torch.save`` file, read with ``weights_only=True``).

    Returns:
        The model in train mode, with ``model.pretrained_cfg`` set.

    Raises:
        KeyError: unknown name or weight set (with a suggestion).
        ValueError: weights corrupt, tampered, pickled without consent, or not fitting; bad
            ``out_indices`` / ``output_stride``.
        openmednet.models.WeightsUnavailableError: weights need a download that cannot be made.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not features_only and (out_indices is not None or output_stride is not None):
        raise ValueError("out_indices and output_stride select feature maps: pass features_only=True as well")
    arch, tag = split_model_name(name)
    model = build_model(
        arch,
        model_entrypoint(arch),
        tag=tag,
        pretrained=pretrained or tag is not None,
        num_classes=0 if features_only else num_classes,
        in_chans=in_chans,
        **kwargs,
    )
    if features_only:
        return to_features(model, out_indices, output_stride)
    return model


def load_pretrained(
    path: str | Path, *, num_classes: int | None = None, in_chans: int | None = None, **kwargs: Any
) -> nn.Module:
    """Rebuild a model saved with ``save_pretrained`` from its directory or model card.

    Args:
        path: directory holding ``model_card.json`` + weights, or the card's ``.json`` path.
        num_classes: new head size (re-initialised when it differs from the card's).
        in_chans: new input channels (first conv adapted between 1 and 3).
        **kwargs: overrides of the card's ``model_args``; ``features_only=True`` (with
            ``out_indices``, ``output_stride``) gives the feature extractor, as in ``create_model``.

    Returns:
        The model with weights loaded (checksum verified) and ``pretrained_cfg`` from the card.
    """
    card = read_model_card(path)
    return create_model(
        card.architecture, pretrained_file=path, num_classes=num_classes, in_chans=in_chans, **kwargs
    )

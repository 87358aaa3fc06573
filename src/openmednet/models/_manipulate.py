"""Fitting pretrained weights to a model built with other input channels or classes (timm's name).

``adapt_input_conv`` adapts the first-conv kernel between channel counts (timm semantics: sum to
1 channel, tile and rescale otherwise); ``load_state_dict_adapted`` loads a state dict with that
conv adapted and a head that does not fit ``num_classes`` left freshly initialised, and refuses
every other mismatch instead of loading part of the weights silently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["adapt_input_conv", "load_state_dict_adapted"]

_logger = logging.getLogger(__name__)


def adapt_input_conv(in_chans: int, conv_weight: Tensor) -> Tensor:
    """Adapt a first-conv kernel ``(O, I, kH, kW)`` to ``in_chans`` input channels.

    timm's rule (``timm.models.adapt_input_conv``), with the weights' own channel count as base:

    - to 1 channel: sum the kernels over input channels. For a gray image ``g`` the adapted conv
      gives exactly what the original gives on ``g`` repeated to ``I`` channels.
    - from ``I`` to ``C`` channels otherwise: tile the kernels to ``C`` and scale by ``I / C``
      (1 -> 3: repeat and divide by 3), exact when all ``C`` channels carry the same image.

    Returns:
        ``(O, in_chans, kH, kW)`` tensor (the input itself when nothing changes).

    Raises:
        ValueError: ``in_chans < 1``, or ``conv_weight`` is not a 4-D conv kernel.
    """
    from timm.models import adapt_input_conv as timm_adapt

    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    try:
        return timm_adapt(in_chans, conv_weight, base_chans=conv_weight.shape[1])
    except NotImplementedError as e:
        raise ValueError(
            f"cannot adapt first-conv weights of shape {tuple(conv_weight.shape)} to {in_chans} input "
            f"channels ({e}); expected a 4-D (out, in, kH, kW) Conv2d kernel: check PretrainedCfg.first_conv"
        ) from None


def _tensor_prefix(module_path: str) -> str:
    return f"{module_path}." if module_path else ""


def load_state_dict_adapted(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    first_conv: str,
    classifier: str,
    source: str = "weights",
) -> list[str]:
    """Load ``state_dict`` into ``model``, adapting the first conv and dropping a mismatched head.

    Every other tensor must match the model in name and shape; anything else is an error rather
    than a silent partial load.

    Args:
        model: the target, already built with its final ``in_chans`` and ``num_classes``.
        state_dict: weights, e.g. from :func:`load_weights`.
        first_conv: module path of the first convolution (``PretrainedCfg.first_conv``).
        classifier: module path of the final linear layer (``PretrainedCfg.classifier``).
        source: what the weights are, for error messages.

    Returns:
        Names of model tensors left at their fresh initialisation (the replaced head), or ``[]``.

    Raises:
        ValueError: names or shapes do not fit the model (different architecture or width).
    """
    target = model.state_dict()
    sd = dict(state_dict)
    conv_key = f"{first_conv}.weight"
    if conv_key in sd and conv_key in target and sd[conv_key].shape[1] != target[conv_key].shape[1]:
        _logger.info("adapting %s from %d to %d input channels",
                     conv_key, sd[conv_key].shape[1], target[conv_key].shape[1])
        sd[conv_key] = adapt_input_conv(target[conv_key].shape[1], sd[conv_key])

    head = _tensor_prefix(classifier)
    head_keys = [k for k in sd if k.startswith(head)]
    if any(k not in target or target[k].shape != sd[k].shape for k in head_keys):
        _logger.info("replacing classifier '%s' (the weights' head does not fit num_classes)", classifier)
        for k in head_keys:
            del sd[k]
    # With num_classes=0 a nested head (MedNet's head.fc1) becomes Identity: its tensors are unused.
    parent = classifier.rpartition(".")[0]
    unused_ok = _tensor_prefix(parent) if parent and getattr(model, "num_classes", None) == 0 else None
    # Conversely, weights saved as a feature extractor (num_classes=0: pre-training backbones) hold
    # no tensor of that nested head; all of it is new for a model with classes.
    new_head = (head,)
    if parent and not any(k.startswith(_tensor_prefix(parent)) for k in sd):
        new_head += (_tensor_prefix(parent),)

    unexpected = [k for k in sd if k not in target and not (unused_ok and k.startswith(unused_ok))]
    missing = [k for k in target if k not in sd and not k.startswith(new_head)]
    shape = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
             for k in sd if k in target and sd[k].shape != target[k].shape]
    if unexpected or missing or shape:
        parts = []
        for what, keys in (("unexpected", unexpected), ("missing", missing), ("shape mismatch", shape)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})")
        raise ValueError(
            f"{source} do not fit {type(model).__name__}: {'; '.join(parts)}. They were saved from a "
            f"different architecture or model_args (e.g. width_mult): rebuild the model with the "
            f"arguments in the weights' model card"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    return [k for k in target if k not in sd]

"""Export a model as ``model.safetensors`` + ``model_card.json`` (the format OpenMedNet loads).

A thin wrapper over :func:`openmednet.models.save_pretrained`, the one writer of weights files, so
exported folders load anywhere ``openmednet`` accepts a model (``predict``, ``serve``,
``create_model(..., pretrained_file=...)``) and in plain ``safetensors``::

    from safetensors.torch import load_file
    state_dict = load_file("out/model.safetensors")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from openmednet.models._weights import CARD_FILE, WEIGHTS_FILE, save_pretrained

__all__ = ["export_safetensors"]


def export_safetensors(model: nn.Module, out_dir: str | Path, **card: Any) -> tuple[Path, Path]:
    """Write ``out_dir/model.safetensors`` and ``out_dir/model_card.json`` atomically.

    Args:
        model: a model built by ``openmednet.create_model`` or loaded from a model directory.
        out_dir: destination directory (created if needed).
        **card: model-card fields passed to ``save_pretrained`` (``label_names``, ``metrics``,
            ``license``...); unset fields come from ``model.pretrained_cfg``.

    Returns:
        The paths of the weights file and of the model card.
    """
    out_dir = Path(out_dir)
    save_pretrained(model, out_dir, **card)
    return out_dir / WEIGHTS_FILE, out_dir / CARD_FILE

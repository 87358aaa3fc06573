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
            ``license``...); unset fields come from ``model.pretrained_cfg``, provenance (data,
            objective, epochs, metrics, corpus fingerprint) from the card the model was loaded with.

    Returns:
        The paths of the weights file and of the model card.
    """
    out_dir = Path(out_dir)
    save_pretrained(model, out_dir, **{**_provenance(model), **card})
    return out_dir / WEIGHTS_FILE, out_dir / CARD_FILE


def _provenance(model: nn.Module) -> dict[str, Any]:
    """The card's provenance as loading recorded it in ``model.pretrained_cfg.meta``: training data,
    objective, epochs, metrics, details and the corpus fingerprint (the leakage checks need it).

    ``save_pretrained`` takes these only as arguments, so an export without them wrote a card with
    no data, no metrics and no fingerprint, and an export into the model's own folder erased them.
    """
    meta = getattr(getattr(model, "pretrained_cfg", None), "meta", None) or {}
    out = {key: meta[key] for key in ("data", "objective", "epochs", "metrics", "details") if meta.get(key) is not None}
    fingerprint = meta.get("corpus_fingerprint")
    if fingerprint:
        out["corpus_fingerprint"] = fingerprint["file"]
    return out

"""Model loading for prediction: a saved run (classifier or segmenter, told apart by its card) or a registered weight set."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from openmednet.models import (
    InitSpec,
    create_model,
    get_pretrained_cfg,
    is_model,
    load_pretrained,
)
from openmednet.models._weights import CARD_FILE, resolve_card_path

__all__ = ["load_model"]


def load_model(spec: str | Path) -> nn.Module:
    """Load a model with its weights from a saved model directory/file or a registered weight set.

    A registry name is never built with random weights: an untrained 1000-class model gives a
    confident-looking label that changes from run to run.

    Args:
        spec: a directory holding ``model.safetensors`` and its model card (written by
            ``save_pretrained``; ``openmednet finetune --out RUN`` writes ``RUN/model``), the run
            folder ``RUN`` itself, the ``.safetensors`` file, or a registered weight set
            (``"mednet_gray.<tag>"``, or ``"mednet_gray"`` for its default weights). A
            segmentation run (``finetune --task segmentation``) is recognised from its card.

    Returns:
        The model in eval mode with ``model.pretrained_cfg`` set: a classifier, or an
        ``eval.segmentation.SegmentationNet`` (``model.task == "segmentation"``).

    Raises:
        FileNotFoundError: ``spec`` is neither a registered name nor an existing path.
        ValueError: ``spec`` is an architecture without registered weights, or a path that holds
            no saved model.
    """
    try:
        init = InitSpec.parse(spec)  # the init grammar of fine-tuning: one parser
    except (FileNotFoundError, ValueError):
        init = None  # reported below with what prediction accepts
    if init is not None and init.kind == "path":
        return _load_saved(init.path, spec)
    if init is not None and init.kind in ("auto", "scratch"):
        raise ValueError(f"'{spec}' says how to start fine-tuning, not which trained model to use: fine-tune first "
                         f"(openmednet finetune --data DIR --init {spec} --out runs/x) and pass runs/x/model")
    if init is not None and is_model(init.name):
        if get_pretrained_cfg(str(spec), allow_missing=True) is None:
            raise ValueError(
                f"'{spec}' is an architecture without weights: a randomly initialised model predicts noise. "
                f"Fine-tune it first (openmednet finetune --data DIR --init scratch:{spec} --out runs/x) and "
                f"pass the run's model folder (runs/x/model)"
            )
        return create_model(str(spec), pretrained=True).eval()
    raise FileNotFoundError(
        f"model '{spec}' is neither a registered model (see `openmednet models list`) nor an existing "
        "directory/file with model.safetensors and its model card"
    )


def _model_folder(path: Path) -> Path:
    """The folder of a saved model: ``path`` itself, a weights file's folder, or ``RUN/model``."""
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent  # the card sits next to its weights (save_pretrained's layout)
    if path.is_dir() and not (path / CARD_FILE).is_file() and (path / "model" / CARD_FILE).is_file():
        return path / "model"  # a fine-tuning run folder
    return path


def _load_saved(path: Path, spec: str | Path) -> nn.Module:
    """A saved classifier or segmenter, told apart by its card (see :func:`load_model`)."""
    from openmednet.eval.segmentation import (
        is_segmentation_model,
        load_segmentation_model,
    )

    folder = _model_folder(path)
    if is_segmentation_model(folder):
        return load_segmentation_model(folder)
    if not resolve_card_path(folder).is_file():
        raise FileNotFoundError(f"'{spec}' holds no saved model: expected a fine-tuning run folder RUN or RUN/model "
                                f"(written by `openmednet finetune --out RUN`, classification or segmentation), "
                                f"its model.safetensors, or a {CARD_FILE}")
    try:
        return load_pretrained(folder).eval()  # verifies the checksum the card records
    except ValueError:
        if folder.is_file() and folder.suffix != ".json":
            raise ValueError(f"'{spec}' is not a saved model (no classification or segmentation model card): pass a "
                             f"fine-tuning run folder RUN or RUN/model, its model.safetensors or a {CARD_FILE}") from None
        raise

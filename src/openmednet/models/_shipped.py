"""Shipped weights: register every model card found in ``openmednet/assets/weights``.

A weight set is shipped by dropping two files, as written by
``save_pretrained(model, dir, tag="<tag>", default=...)``::

    <arch>.<tag>.safetensors    e.g. mednet_gray.sup_multisource_v1.safetensors
    <arch>.<tag>.json           its model card (architecture, model_args, input contract, sha256)

At the first lookup of weight sets (not at import: ``openmednet.models`` defers it), each card
becomes a ``PretrainedCfg`` with ``source="package"`` registered as ``<arch>.<tag>``, so
``create_model("mednet_gray", pretrained=True)`` loads the card marked ``"default": true``
offline, verifying its checksum. ``$OPENMEDNET_WEIGHTS_DIR`` replaces the
folder (tests, or weights kept outside the package).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from openmednet.models._builder import package_weights_dir
from openmednet.models._card import read_model_card
from openmednet.models._registry import model_entrypoint, register_pretrained_cfgs

__all__ = ["register_shipped_weights"]

_logger = logging.getLogger(__name__)


def register_shipped_weights(weights_dir: str | Path | None = None, *, strict: bool = True) -> list[str]:
    """Register the weight sets whose model cards (``<arch>.<tag>.json``) lie in ``weights_dir``.

    Args:
        weights_dir: folder to scan; defaults to :func:`package_weights_dir`.
        strict: raise on a bad card; when false (at import), warn and skip it so that one broken
            file does not make ``import openmednet`` fail.

    Returns:
        The registered names, ``"arch.tag"``, sorted.

    Raises:
        ValueError: (strict) a card is invalid, has no tag, does not match its file name, points
            at a missing weights file, or a second card claims to be an architecture's default.
        KeyError: (strict) a card names an unregistered architecture, or the weight set is
            already registered.
    """
    folder = Path(weights_dir) if weights_dir is not None else package_weights_dir()
    if not folder.is_dir():
        return []
    registered, defaults = [], {}
    for card_path in sorted(folder.glob("*.json")):
        try:
            name = _register_card(card_path, defaults)
        except (ValueError, KeyError, FileNotFoundError) as e:
            if strict:
                raise
            warnings.warn(f"skipping shipped weights {card_path.name}: {e}", stacklevel=2)
            continue
        registered.append(name)
    _logger.debug("registered shipped weights from %s: %s", folder, registered)
    return registered


def _register_card(card_path: Path, defaults: dict[str, str]) -> str:
    card = read_model_card(card_path)
    name = f"{card.architecture}.{card.tag}"
    if not card.tag or card_path.name != f"{name}.json":
        raise ValueError(
            f"{card_path}: a shipped card must be named '<arch>.<tag>.json' after its own architecture "
            f"and tag (got tag {card.tag!r}, expected file name '{name}.json'); save it with "
            f"save_pretrained(model, dir, tag='<tag>')"
        )
    model_entrypoint(card.architecture)  # KeyError with a suggestion if unknown
    weights = card_path.parent / card.weights_file
    if not weights.is_file():
        raise FileNotFoundError(f"{card_path}: weights file {weights.name} is missing next to the card")
    if card.default and card.architecture in defaults:
        raise ValueError(
            f"{card_path}: '{card.architecture}' already has default weights "
            f"'{defaults[card.architecture]}'; mark only one card per architecture \"default\": true"
        )
    cfg = card.to_pretrained_cfg(source="package", file=str(weights.resolve()))
    register_pretrained_cfgs(card.architecture, {card.tag: cfg}, default=card.tag if card.default else None)
    if card.default:
        defaults[card.architecture] = name
    return name

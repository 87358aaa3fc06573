"""Writing a model: ``save_pretrained`` (safetensors weights + model card) and fingerprint records.

The weights file is reproducible: the same state dict gives the same bytes (sorted header
metadata, ``_fixed_order_header``), so the card's SHA-256 identifies identical weights. Each file
is written atomically, the weights first, so a card on disk always points at a complete file.
The card's schema and JSON layout are ``_card.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openmednet.models._card import CARD_FILE, WEIGHTS_FILE, ModelCard, card_cfg, read_model_card, resolve_card_path
from openmednet.models._pretrained import PretrainedCfg
from openmednet.utils import atomic_write_bytes, atomic_write_text, sha256_file

__all__ = ["FINGERPRINT_SUFFIX", "record_corpus_fingerprint", "save_pretrained"]

_logger = logging.getLogger(__name__)

#: Ending of the pre-training corpus fingerprint written next to weights (``openmednet.data.fingerprint``).
FINGERPRINT_SUFFIX = ".corpus.npz"


def _model_args(model: nn.Module) -> dict[str, Any]:
    """Constructor kwargs of ``model``: ``model.model_args()`` (MedNet) or what the builder recorded."""
    if callable(getattr(model, "model_args", None)):
        return dict(model.model_args())
    cfg = getattr(model, "pretrained_cfg", None)
    args = dict(cfg.meta.get("model_args", {})) if cfg is not None else {}
    # The head may have been reset since construction; the live value wins.
    if isinstance(getattr(model, "num_classes", None), int):
        args["num_classes"] = model.num_classes
    return args


def _package_version() -> str:
    """Installed openmednet version (read from metadata: models must not import the top package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openmednet")
    except PackageNotFoundError:
        return "unknown"


def save_pretrained(
    model: nn.Module,
    out_dir: str | Path,
    *,
    architecture: str | None = None,
    tag: str | None = None,
    default: bool = False,
    data: tuple[str, ...] | list[str] = (),
    objective: str = "",
    epochs: int | None = None,
    metrics: Mapping[str, float] | None = None,
    license: str | None = None,
    input_size: tuple[int, int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    intensity: str | None = None,
    label_names: tuple[str, ...] | list[str] | None = None,
    corpus_fingerprint: str | Path | None = None,
    details: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Write ``model``'s weights (safetensors) and its model card, each atomically.

    Without ``tag`` the files are ``model.safetensors`` and ``model_card.json``. With ``tag`` they
    are ``<architecture>.<tag>.safetensors`` and ``<architecture>.<tag>.json``: the layout that
    ``openmednet/assets/weights`` (shipped weights) expects. The weights are written first, so a
    card on disk always points at a complete file.

    Input-contract fields default to ``model.pretrained_cfg`` (set by ``create_model``); pass them
    to record how the training images were actually prepared.

    Args:
        model: a model built by ``openmednet.create_model`` (or any module with ``pretrained_cfg``).
        out_dir: destination directory (created if needed).
        architecture: registered name; defaults to ``model.pretrained_cfg.meta["architecture"]``.
        tag: weight-set tag, for shipped weights (``mednet_gray.<tag>``).
        default: mark this weight set as the architecture's default when shipped.
        data, objective, epochs, metrics, license: provenance recorded in the card.
        input_size, mean, std, intensity, label_names: input contract overrides.
        corpus_fingerprint: fingerprint file of the pre-training corpus (written by
            ``openmednet.data.fingerprint.save_corpus_fingerprint``); copied next to the weights
            as ``<stem>.corpus.npz`` unless it is already there, and named in the card with its
            SHA-256 so that test images can be checked against the corpus without having it.
        details: free-form provenance recorded in the card (see :class:`ModelCard`).

    Returns:
        The card that was written.

    Raises:
        ValueError: the architecture is unknown (pass ``architecture=``).
        FileNotFoundError: ``corpus_fingerprint`` does not exist.
    """
    cfg = getattr(model, "pretrained_cfg", None) or PretrainedCfg()
    architecture = architecture or cfg.meta.get("architecture")
    if not architecture:
        raise ValueError(
            "cannot tell which architecture this model is (no model.pretrained_cfg.meta['architecture']); "
            "build it with openmednet.create_model or pass architecture='<registered name>'"
        )
    out_dir = Path(out_dir)
    stem = f"{architecture}.{tag}" if tag else None
    weights_name = f"{stem}.safetensors" if stem else WEIGHTS_FILE
    card_name = f"{stem}.json" if stem else CARD_FILE
    fingerprint = _place_fingerprint(corpus_fingerprint, out_dir, stem) if corpus_fingerprint else None

    from safetensors.torch import save as safetensors_save

    # contiguous(): safetensors stores raw buffers and rejects strided views.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = _fixed_order_header(safetensors_save(state, metadata={"format": "pt", "architecture": architecture}))
    atomic_write_bytes(out_dir / weights_name, blob)

    # The input contract is the model's, with what the caller recorded as given (falsy: not given).
    given = {"input_size": input_size and tuple(input_size), "mean": mean and tuple(mean),
             "std": std and tuple(std), "intensity": intensity, "license": license}
    card = ModelCard(
        architecture=architecture,
        model_args=_model_args(model),
        pretrained_cfg=card_cfg(
            cfg,
            sha256=hashlib.sha256(blob).hexdigest(),
            num_params=sum(p.numel() for p in model.parameters()),
            num_classes=int(getattr(model, "num_classes", cfg.num_classes)),
            label_names=tuple(label_names if label_names is not None else cfg.label_names),
            **{k: v for k, v in given.items() if v},
        ),
        weights_file=weights_name,
        tag=tag,
        default=default,
        data=tuple(data),
        objective=objective,
        epochs=epochs,
        corpus_fingerprint=fingerprint.name if fingerprint else None,
        corpus_fingerprint_sha256=sha256_file(fingerprint) if fingerprint else None,
        metrics=dict(metrics or {}),
        details=dict(details or {}),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        software={"openmednet": _package_version(), "torch": torch.__version__},
    )
    atomic_write_text(out_dir / card_name, json.dumps(card.to_dict(), indent=2) + "\n")
    _logger.info("saved %s (%d tensors, sha256 %s) and %s", weights_name, len(state), card.sha256[:12], card_name)
    return card


def _fixed_order_header(blob: bytes) -> bytes:
    """A safetensors file with its header metadata in sorted key order: same weights, same bytes.

    safetensors keeps ``__metadata__`` in a Rust ``HashMap``, whose iteration order is seeded per
    map, so two saves of one state dict could differ in their first bytes and the card's SHA-256
    could not identify identical weights. Tensor entries are already in a fixed order (by data
    offset) and are kept; the compact JSON and the space padding to 8 bytes are safetensors' own.
    """
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} if "__metadata__" in header else {}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + length :]


def _place_fingerprint(path: str | Path, out_dir: Path, stem: str | None) -> Path:
    """``out_dir/<stem>.corpus.npz`` holding the fingerprint at ``path`` (copied when elsewhere)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus fingerprint not found: {path}; write it with "
            f"openmednet.data.fingerprint.save_corpus_fingerprint(corpus_dir, path)"
        )
    dest = out_dir / f"{stem or Path(WEIGHTS_FILE).stem}{FINGERPRINT_SUFFIX}"
    if not (dest.exists() and dest.resolve() == path.resolve()):
        atomic_write_bytes(dest, path.read_bytes())
    return dest


def record_corpus_fingerprint(card_path: str | Path, fingerprint: str | Path) -> ModelCard:
    """Name a corpus fingerprint in an existing model card (weights saved before it existed).

    The fingerprint is copied next to the card as ``<stem>.corpus.npz`` (``<arch>.<tag>`` for
    shipped weights) when it lies elsewhere; the card is rewritten atomically with its file name
    and SHA-256. The weights and their checksum are untouched.

    Args:
        card_path: the card's ``.json``, or a ``save_pretrained`` directory.
        fingerprint: a file written by ``save_corpus_fingerprint``.

    Returns:
        The updated card.

    Raises:
        FileNotFoundError: no card or no fingerprint file.
        ValueError: the card is invalid.
    """
    card_path = resolve_card_path(card_path)
    card = read_model_card(card_path)
    stem = None if card_path.name == CARD_FILE else card_path.name.removesuffix(".json")
    placed = _place_fingerprint(fingerprint, card_path.parent, stem)
    updated = replace(card, corpus_fingerprint=placed.name, corpus_fingerprint_sha256=sha256_file(placed))
    atomic_write_text(card_path, json.dumps(updated.to_dict(), indent=2) + "\n")
    _logger.info("%s: corpus fingerprint %s recorded", card_path, placed.name)
    return updated



"""Reading weights: ``load_weights``, the entry point every loader goes through.

A saved model is two files (``save_pretrained``, ``_save.py``)::

    model.safetensors   the state dict (safetensors: no code runs when it is read)
    model_card.json     ModelCard (``_card.py``): architecture + kwargs, input contract, provenance, sha256

``load_weights`` verifies the SHA-256 the card records, refuses pickle files unless the caller
opts in (``_pickle.py``), refuses non-finite tensors, and turns truncated or corrupted files into
a ``ValueError`` that names the problem and the fix. Fitting the weights to a model with other
channels or classes is ``_manipulate.py``; building a model from a card is
``openmednet.load_pretrained`` (``_builder.py``).

The names of those modules are re-exported here, where they lived before the split, so that
``from openmednet.models._weights import ...`` keeps working.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from openmednet.models._card import (
    CARD_FILE,
    MODEL_CARD_VERSION,
    WEIGHTS_FILE,
    ModelCard,
    check_model_card,
    read_model_card,
    resolve_card_path,
)
from openmednet.models._manipulate import adapt_input_conv, load_state_dict_adapted
from openmednet.models._pickle import load_pickle_state, sniff_format
from openmednet.models._save import FINGERPRINT_SUFFIX, record_corpus_fingerprint, save_pretrained
from openmednet.utils import sha256_file

__all__ = [
    "CARD_FILE",
    "FINGERPRINT_SUFFIX",
    "MODEL_CARD_VERSION",
    "WEIGHTS_FILE",
    "ModelCard",
    "WeightsUnavailableError",
    "adapt_input_conv",
    "check_model_card",
    "load_state_dict_adapted",
    "load_weights",
    "read_model_card",
    "record_corpus_fingerprint",
    "resolve_card_path",
    "save_pretrained",
    "verify_sha256",
]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights exist but cannot be obtained here (no internet, package not installed)."""


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise ``ValueError`` unless the SHA-256 of ``path`` is ``expected`` (hex, any case)."""
    actual = sha256_file(Path(path))
    if actual != expected.lower():
        raise ValueError(
            f"checksum mismatch for {path}: sha256 is {actual}, the model card expects {expected}. "
            f"The file is incomplete or was modified: download or save it again (never edit weights by hand)"
        )


def load_weights(path: str | Path, *, sha256: str | None = None, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Read a state dict from a safetensors file (or, if allowed, a ``torch.save`` file).

    The format is recognised from the file's first bytes, not its name. Pickle files can run
    arbitrary code when read, so they are refused unless ``allow_pickle=True``, and even then read
    with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.

    Args:
        path: weights file.
        sha256: expected hex SHA-256 (from a model card); verified before anything is parsed.
        allow_pickle: accept a trusted ``.pth``/``.pt``/``.bin`` file.

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: checksum mismatch; truncated or corrupted file; pickle without ``allow_pickle``;
            a pickle that holds more than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if sha256 is not None:
        verify_sha256(path, sha256)
    if sniff_format(path) == "pickle":
        return _check_finite(load_pickle_state(path, allow_pickle=allow_pickle), path)

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path, device="cpu")
    except SafetensorError as e:
        raise ValueError(
            f"cannot read safetensors file {path} ({e}): it is truncated or corrupted; "
            f"download or save it again"
        ) from None
    return _check_finite(state, path)


def _check_finite(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """``state`` if every floating tensor is finite, else ``ValueError`` naming the first bad ones.

    NaN or inf weights (a diverged run saved anyway, or a damaged export whose checksum was
    recomputed) would give NaN outputs for every image, which predictions would report as labels.
    """
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        total = sum(v.numel() for k, v in state.items() if k in bad)
        nonfinite = sum(int((~torch.isfinite(state[k])).sum()) for k in bad)
        raise ValueError(
            f"{path}: {len(bad)} tensors hold NaN or inf values ({nonfinite} of {total} values, e.g. "
            f"{', '.join(bad[:3])}); the weights come from a diverged run or a damaged file. "
            f"Use an earlier checkpoint or re-train (lower the learning rate)"
        )
    return state

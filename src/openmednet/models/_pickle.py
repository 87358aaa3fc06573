"""Pickle (``torch.save``) weights: recognised from their first bytes, refused unless trusted.

Reading a pickle can execute arbitrary code, so ``load_weights`` (``_weights.py``) refuses one
unless the caller opts in with ``allow_pickle=True``, and even then reads it with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. The format
is told from the bytes, never from the file name: a ``.safetensors`` name proves nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["load_pickle_state", "sniff_format"]

# First bytes of the two torch.save formats: a zip archive (torch >= 1.6) or a raw pickle stream
# (protocol 2+ starts with 0x80). safetensors files start with an 8-byte header length instead.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"
_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")
# Common wrappers of a state dict inside training checkpoints (timm, Lightning, torchvision refs).
_CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema", "model_state_dict")


def sniff_format(path: Path) -> str:
    """``"safetensors"`` or ``"pickle"`` (torch.save, zip or legacy), from the first bytes.

    safetensors is recognised first: its 8-byte little-endian header length may itself start with
    0x80, the pickle protocol marker, so that byte alone does not identify a pickle.

    Raises:
        ValueError: the file is too short for either format, or is neither.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and header_len <= size - 8:
            return "safetensors"
    if head.startswith(_ZIP_MAGIC) or (head[:1] == _PICKLE_MAGIC and head[1:2] in _PICKLE_PROTOCOLS):
        return "pickle"
    if len(head) < 9:
        raise ValueError(
            f"{path} is {size} bytes long, too short for a weights file: it is truncated; "
            f"download or save it again"
        )
    raise ValueError(
        f"{path} is neither a safetensors file (JSON header expected after 8 length bytes) nor a "
        f"torch.save file: it is corrupted or has another format. Expected a .safetensors file "
        f"written by save_pretrained/safetensors, or a trusted .pth with allow_pickle=True"
    )


def load_pickle_state(path: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    """The state dict in the ``torch.save`` file ``path``, read only if ``allow_pickle``.

    Raises:
        ValueError: ``allow_pickle`` is false; the file holds more than tensors; it is truncated
            or corrupted; it holds no state dict.
    """
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickle (torch.save) file; reading one can execute arbitrary code, so it is "
            f"refused by default. Convert it to safetensors (safetensors.torch.save_file(state_dict, "
            f"'model.safetensors')), or pass allow_pickle=True if you trust its origin"
        )
    import pickle

    try:
        return _unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True), path)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects other than tensors, which weights_only loading refuses "
            f"({str(e).splitlines()[0]}); re-save only model.state_dict()"
        ) from None
    except (EOFError, RuntimeError) as e:
        raise ValueError(f"{path} is a truncated or corrupted torch.save file ({e}); download it again") from None


def _unwrap_checkpoint(obj: Any, path: Path) -> dict[str, Tensor]:
    """The state dict inside a ``torch.load`` result (bare dict or a common checkpoint wrapper)."""
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{path} does not hold a state dict (a mapping of names to tensors, or one under "
            f"{'/'.join(_CHECKPOINT_KEYS)}); got {type(obj).__name__}. Save model.state_dict() instead"
        )
    # DistributedDataParallel prefixes every key with "module.".
    return {k.removeprefix("module."): v for k, v in obj.items()}

"""Data: readers for medical image formats, the corpus builder, shards, transforms and datasets.

Public names are imported lazily (PEP 562 ``__getattr__``): ``import openmednet.data`` stays cheap
for tools that only need, say, the readers, and does not pull in torchvision.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it (add new modules' exports here)
_EXPORTS: dict[str, str] = {
    # loader (transforms, datasets, samplers, build_loader)
    "build_transform": "transforms",
    "build_multiview_transform": "transforms",
    "MultiViewTransform": "transforms",
    "FastColorJitter": "transforms",
    "HEDJitter": "transforms",
    "RandomGamma": "transforms",
    "ToChannels": "transforms",
    "CorpusDataset": "datasets",
    "LabelledDataset": "datasets",
    "apply_transform": "datasets",
    "DistributedShardSampler": "samplers",
    "DistributedWeightedSampler": "samplers",
    "balanced_weights": "samplers",
    "build_loader": "loader",
    "build_sampler": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'openmednet.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"openmednet.data.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

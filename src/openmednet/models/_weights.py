"""Weights I/O: safetensors files with a JSON model card, verified and adapted on load.

A saved model is two files (``save_pretrained``)::

    model.safetensors   the state dict (safetensors: no code runs when it is read)
    model_card.json     ModelCard: architecture + kwargs, input contract, provenance, metrics, sha256

Loading (``load_weights``) verifies the SHA-256 the card records, refuses pickle files unless the
caller opts in with ``allow_pickle=True`` (and even then uses ``torch.load(weights_only=True)``),
refuses non-finite tensors, and turns truncated or corrupted files into a ``ValueError`` that names
the problem and the fix.

A card is not trusted further than it can be checked (``read_model_card`` -> ``check_model_card``):
its files are bare names in the card's own folder (never an absolute or ``../`` path), and it must
describe its weights: the architecture is registered, its ``model_args`` build it, and the tensor
names and shapes of that model with the card's channels and classes are those in the weights file.
Otherwise a card claiming 7 input channels or 5 classes would have the first conv adapted or the
head re-initialised silently by the loader.
``load_state_dict_adapted`` then fits the weights to a model built with another number of input
channels (``adapt_input_conv``, timm semantics) or classes (the head is left freshly initialised).

Building a model from a card is ``openmednet.load_pretrained`` (``_builder.py``); the only use of
the registry here is the card check, which builds the architecture on the meta device (no memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PureWindowsPath
from typing import Any

import torch
from torch import Tensor, nn

from openmednet.models._pretrained import PretrainedCfg
from openmednet.models._registry import model_entrypoint
from openmednet.utils import atomic_write_bytes, atomic_write_text, sha256_file

__all__ = [
    "CARD_FILE",
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

_logger = logging.getLogger(__name__)

MODEL_CARD_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
#: Ending of the pre-training corpus fingerprint written next to weights (``openmednet.data.fingerprint``).
FINGERPRINT_SUFFIX = ".corpus.npz"

# First bytes of the two torch.save formats: a zip archive (torch >= 1.6) or a raw pickle stream
# (protocol 2+ starts with 0x80). safetensors files start with an 8-byte header length instead.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"
_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")
# Common wrappers of a state dict inside training checkpoints (timm, Lightning, torchvision refs).
_CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema", "model_state_dict")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights exist but cannot be obtained here (no internet, package not installed)."""


# --------------------------------------------------------------------------------- model card
@dataclass(frozen=True)
class ModelCard:
    """Everything needed to rebuild, feed and trust a saved model (``model_card.json``).

    The JSON groups the fields into sections (``weights``, ``input``, ``head``, ``provenance``)
    so that a person can read it; :meth:`to_dict` / :meth:`from_dict` convert.

    Attributes:
        architecture: registered model name, e.g. ``"mednet_gray"`` or ``"resnet18"``.
        model_args: constructor kwargs that rebuild the architecture (``width_mult``...).
        sha256: hex SHA-256 of the weights file, verified on every load.
        num_params: parameter count of the saved model.
        weights_file: weights file name, next to the card.
        tag: weight-set tag (``mednet_gray.<tag>``), for shipped weights.
        default: whether this is the default weight set of ``architecture`` when shipped.
        input_size: ``(C, H, W)`` the weights were trained at.
        min_input_size: smallest ``(C, H, W)`` the architecture accepts.
        mean, std: per-channel normalisation after intensities were mapped to [0, 1].
        intensity: how raw pixels became [0, 1], e.g. ``"uint8/255"`` or ``"ct_window(40,400)"``.
        interpolation: resize interpolation used in training.
        first_conv, classifier: module paths adapted for new ``in_chans`` / ``num_classes``.
        num_classes: outputs of the saved head (0 = feature extractor).
        label_names: class names of the head, in output order.
        data: training data sources (names or manifest paths).
        objective: training objective, e.g. ``"supervised multi-source"`` or ``"simclr"``.
        epochs: training epochs.
        corpus_fingerprint: file name (next to the card) of the pre-training corpus' fingerprint
            (``<stem>.corpus.npz``: pHashes of every pre-training image, for leakage checks).
        corpus_fingerprint_sha256: its hex SHA-256, verified when the fingerprint is used.
        metrics: evaluation results, ``{"name": value}``.
        license: licence of the weights.
        details: free-form provenance in plain JSON types (sources with image counts, wall time,
            hardware, the command that produced the weights, the evidence the weights were chosen on).
        created: UTC time of saving (ISO 8601).
        software: versions that produced the file (``openmednet``, ``torch``).
        version: model-card schema version (:data:`MODEL_CARD_VERSION`).
    """

    architecture: str
    model_args: dict[str, Any]
    sha256: str
    num_params: int
    weights_file: str = WEIGHTS_FILE
    tag: str | None = None
    default: bool = False
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
    data: tuple[str, ...] = ()
    objective: str = ""
    epochs: int | None = None
    corpus_fingerprint: str | None = None
    corpus_fingerprint_sha256: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    license: str = "unknown"
    created: str = ""
    software: dict[str, str] = field(default_factory=dict)
    version: int = MODEL_CARD_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of ``model_card.json`` (plain types, sections for reading)."""
        return {
            "version": self.version,
            "architecture": self.architecture,
            "tag": self.tag,
            "default": self.default,
            "model_args": dict(self.model_args),
            "weights": {"file": self.weights_file, "sha256": self.sha256, "num_params": self.num_params},
            "input": {
                "channels": self.input_size[0],
                "size": list(self.input_size[1:]),
                "min_size": list(self.min_input_size[1:]),
                "mean": list(self.mean),
                "std": list(self.std),
                "intensity": self.intensity,
                "interpolation": self.interpolation,
            },
            "head": {
                "first_conv": self.first_conv,
                "classifier": self.classifier,
                "num_classes": self.num_classes,
                "label_names": list(self.label_names),
            },
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
            "license": self.license,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "model card") -> ModelCard:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: unsupported schema version, or a required field is missing.
        """
        version = d.get("version")
        if version != MODEL_CARD_VERSION:
            raise ValueError(
                f"{source}: model-card version {version!r} is not supported (expected {MODEL_CARD_VERSION}); "
                f"upgrade openmednet or re-save the model with save_pretrained"
            )
        try:
            w, inp, head, prov = d["weights"], d["input"], d["head"], d["provenance"]
            channels = int(inp["channels"])
            fingerprint = (prov.get("corpus_fingerprint") or {}).get("file")
            _check_file_name(w["file"], "weights.file", source)
            if fingerprint is not None:
                _check_file_name(fingerprint, "provenance.corpus_fingerprint.file", source)
            return cls(
                architecture=d["architecture"],
                model_args=dict(d["model_args"]),
                sha256=w["sha256"],
                num_params=int(w["num_params"]),
                weights_file=w["file"],
                tag=d.get("tag"),
                default=bool(d.get("default", False)),
                input_size=(channels, *map(int, inp["size"])),
                min_input_size=(channels, *map(int, inp["min_size"])),
                mean=tuple(inp["mean"]),
                std=tuple(inp["std"]),
                intensity=inp["intensity"],
                interpolation=inp["interpolation"],
                first_conv=head["first_conv"],
                classifier=head["classifier"],
                num_classes=int(head["num_classes"]),
                label_names=tuple(head["label_names"]),
                data=tuple(prov["data"]),
                objective=prov["objective"],
                epochs=prov["epochs"],
                corpus_fingerprint=fingerprint,
                corpus_fingerprint_sha256=(prov.get("corpus_fingerprint") or {}).get("sha256"),
                metrics=dict(d.get("metrics", {})),
                license=d.get("license", "unknown"),
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
        """The registry's view of these weights (input contract + where to find them).

        Args:
            source: ``PretrainedCfg.source``, e.g. ``"package"`` for shipped weights.
            file: path of the weights file (defaults to :attr:`weights_file`); the corpus
                fingerprint, if any, is recorded in ``meta`` as a path in the same folder.
        """
        fingerprint = None
        if self.corpus_fingerprint:
            folder = Path(file).parent if file else Path()
            fingerprint = {"file": str(folder / self.corpus_fingerprint), "sha256": self.corpus_fingerprint_sha256}
        return PretrainedCfg(
            file=file or self.weights_file,
            source=source,
            sha256=self.sha256,
            input_size=self.input_size,
            min_input_size=self.min_input_size,
            mean=self.mean,
            std=self.std,
            intensity=self.intensity,
            interpolation=self.interpolation,
            first_conv=self.first_conv,
            classifier=self.classifier,
            num_classes=self.num_classes,
            label_names=self.label_names,
            license=self.license,
            num_params=self.num_params,
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
            },
        )


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
    channels = card.input_size[0]
    for key, value in (("in_chans", channels), ("num_classes", card.num_classes)):
        if key in card.model_args and card.model_args[key] != value:
            raise ValueError(
                f"{source}: model_args.{key}={card.model_args[key]!r} contradicts the card's "
                f"{'input.channels' if key == 'in_chans' else 'head.num_classes'}={value}; re-save the model "
                f"with save_pretrained instead of editing the card"
            )
    if card.label_names and len(card.label_names) != card.num_classes:
        raise ValueError(f"{source}: {len(card.label_names)} label_names for head.num_classes={card.num_classes}")

    args = {**card.model_args, "in_chans": channels, "num_classes": card.num_classes}
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
    if card.num_params != num_params:
        raise ValueError(f"{source}: weights.num_params is {card.num_params}, the model has {num_params}")


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

    card = ModelCard(
        architecture=architecture,
        model_args=_model_args(model),
        sha256=hashlib.sha256(blob).hexdigest(),
        num_params=sum(p.numel() for p in model.parameters()),
        weights_file=weights_name,
        tag=tag,
        default=default,
        input_size=tuple(input_size or cfg.input_size),
        min_input_size=tuple(cfg.min_input_size),
        mean=tuple(mean or cfg.mean),
        std=tuple(std or cfg.std),
        intensity=intensity or cfg.intensity,
        interpolation=cfg.interpolation,
        first_conv=cfg.first_conv,
        classifier=cfg.classifier,
        num_classes=int(getattr(model, "num_classes", cfg.num_classes)),
        label_names=tuple(label_names if label_names is not None else cfg.label_names),
        data=tuple(data),
        objective=objective,
        epochs=epochs,
        corpus_fingerprint=fingerprint.name if fingerprint else None,
        corpus_fingerprint_sha256=sha256_file(fingerprint) if fingerprint else None,
        metrics=dict(metrics or {}),
        details=dict(details or {}),
        license=license or cfg.license,
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


# --------------------------------------------------------------------------------- reading weights
def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise ``ValueError`` unless the SHA-256 of ``path`` is ``expected`` (hex, any case)."""
    actual = sha256_file(Path(path))
    if actual != expected.lower():
        raise ValueError(
            f"checksum mismatch for {path}: sha256 is {actual}, the model card expects {expected}. "
            f"The file is incomplete or was modified: download or save it again (never edit weights by hand)"
        )


def _sniff_format(path: Path) -> str:
    """``"safetensors"`` or ``"pickle"`` (torch.save, zip or legacy), from the first bytes.

    safetensors is recognised first: its 8-byte little-endian header length may itself start with
    0x80, the pickle protocol marker, so that byte alone does not identify a pickle.
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
    if _sniff_format(path) == "pickle":
        if not allow_pickle:
            raise ValueError(
                f"{path} is a pickle (torch.save) file; reading one can execute arbitrary code, so it is "
                f"refused by default. Convert it to safetensors (safetensors.torch.save_file(state_dict, "
                f"'model.safetensors')), or pass allow_pickle=True if you trust its origin"
            )
        import pickle

        try:
            state = _unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True), path)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{path} holds objects other than tensors, which weights_only loading refuses "
                f"({str(e).splitlines()[0]}); re-save only model.state_dict()"
            ) from None
        except (EOFError, RuntimeError) as e:
            raise ValueError(f"{path} is a truncated or corrupted torch.save file ({e}); download it again") from None
        return _check_finite(state, path)

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


# --------------------------------------------------------------------------------- adapting
def adapt_input_conv(in_chans: int, conv_weight: Tensor) -> Tensor:
    """Adapt a first-conv kernel ``(O, I, kH, kW)`` to ``in_chans`` input channels.

    timm's rule (``timm.models.adapt_input_conv``), with the weights' own channel count as base:

    - to 1 channel: sum the kernels over input channels. For a gray image ``g`` the adapted conv
      gives exactly what the original gives on ``g`` repeated to ``I`` channels.
    - from ``I`` to ``C`` channels otherwise: tile the kernels to ``C`` and scale by ``I / C``
      (1 -> 3: repeat and divide by 3), exact when all ``C`` channels carry the same image.

    Returns:
        ``(O, in_chans, kH, kW)`` tensor (the input itself when nothing changes).

    Raises:
        ValueError: ``in_chans < 1``, or ``conv_weight`` is not a 4-D conv kernel.
    """
    from timm.models import adapt_input_conv as timm_adapt

    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    try:
        return timm_adapt(in_chans, conv_weight, base_chans=conv_weight.shape[1])
    except NotImplementedError as e:
        raise ValueError(
            f"cannot adapt first-conv weights of shape {tuple(conv_weight.shape)} to {in_chans} input "
            f"channels ({e}); expected a 4-D (out, in, kH, kW) Conv2d kernel: check PretrainedCfg.first_conv"
        ) from None


def _tensor_prefix(module_path: str) -> str:
    return f"{module_path}." if module_path else ""


def load_state_dict_adapted(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    first_conv: str,
    classifier: str,
    source: str = "weights",
) -> list[str]:
    """Load ``state_dict`` into ``model``, adapting the first conv and dropping a mismatched head.

    Every other tensor must match the model in name and shape; anything else is an error rather
    than a silent partial load.

    Args:
        model: the target, already built with its final ``in_chans`` and ``num_classes``.
        state_dict: weights, e.g. from :func:`load_weights`.
        first_conv: module path of the first convolution (``PretrainedCfg.first_conv``).
        classifier: module path of the final linear layer (``PretrainedCfg.classifier``).
        source: what the weights are, for error messages.

    Returns:
        Names of model tensors left at their fresh initialisation (the replaced head), or ``[]``.

    Raises:
        ValueError: names or shapes do not fit the model (different architecture or width).
    """
    target = model.state_dict()
    sd = dict(state_dict)
    conv_key = f"{first_conv}.weight"
    if conv_key in sd and conv_key in target and sd[conv_key].shape[1] != target[conv_key].shape[1]:
        _logger.info("adapting %s from %d to %d input channels",
                     conv_key, sd[conv_key].shape[1], target[conv_key].shape[1])
        sd[conv_key] = adapt_input_conv(target[conv_key].shape[1], sd[conv_key])

    head = _tensor_prefix(classifier)
    head_keys = [k for k in sd if k.startswith(head)]
    if any(k not in target or target[k].shape != sd[k].shape for k in head_keys):
        _logger.info("replacing classifier '%s' (the weights' head does not fit num_classes)", classifier)
        for k in head_keys:
            del sd[k]
    # With num_classes=0 a nested head (MedNet's head.fc1) becomes Identity: its tensors are unused.
    parent = classifier.rpartition(".")[0]
    unused_ok = _tensor_prefix(parent) if parent and getattr(model, "num_classes", None) == 0 else None
    # Conversely, weights saved as a feature extractor (num_classes=0: pre-training backbones) hold
    # no tensor of that nested head; all of it is new for a model with classes.
    new_head = (head,)
    if parent and not any(k.startswith(_tensor_prefix(parent)) for k in sd):
        new_head += (_tensor_prefix(parent),)

    unexpected = [k for k in sd if k not in target and not (unused_ok and k.startswith(unused_ok))]
    missing = [k for k in target if k not in sd and not k.startswith(new_head)]
    shape = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
             for k in sd if k in target and sd[k].shape != target[k].shape]
    if unexpected or missing or shape:
        parts = []
        for what, keys in (("unexpected", unexpected), ("missing", missing), ("shape mismatch", shape)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})")
        raise ValueError(
            f"{source} do not fit {type(model).__name__}: {'; '.join(parts)}. They were saved from a "
            f"different architecture or model_args (e.g. width_mult): rebuild the model with the "
            f"arguments in the weights' model card"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    return [k for k in target if k not in sd]

"""The segmentation model: a U-Net on an init's encoder, its input pipeline, and its saved form.

``SegmentationNet`` (smp's U-Net split into ``encoder`` and ``head``), ``build_segmentation_model``
(the encoder from any classification init), ``save_segmentation_model`` /
``load_segmentation_model`` / ``is_segmentation_model`` (``model.safetensors`` + a card with
``"task": "segmentation"``) and ``segmentation_inputs`` (the one evaluation and prediction
pipeline of a segmentation contract).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from openmednet.engine.inputs import EvalInputs
from openmednet.models import to_features
from openmednet.utils import atomic_write_text

__all__ = ["DECODER_CHANNELS", "EVAL_RESIZE", "SIZE_MULTIPLE", "TASK", "SegmentationNet", "build_segmentation_model",
           "is_segmentation_model", "load_segmentation_model", "save_segmentation_model", "segmentation_inputs"]

#: U-Net decoder widths: half of smp's default (256, ..., 16); the CPU-scale encoders end at
#: 224 (MedNet, width 0.5) or 320 (EfficientNet-Lite0) channels.
DECODER_CHANNELS = (128, 64, 32, 16, 16)
#: smp's encoders halve the input five times.
SIZE_MULTIPLE = 32
#: ``EvalInputs`` resize of evaluation and prediction inputs: the whole field of view (a centre
#: crop would leave border pixels without a prediction).
EVAL_RESIZE = "stretch"
#: ``model_card.json["task"]`` of a saved segmentation model.
TASK = "segmentation"
# model_args that shape a classifier's head, not its feature maps.
_HEAD_ARGS = ("num_classes", "pretrained", "in_chans", "drop_rate", "head_hidden_size", "global_pool")


# ------------------------------------------------------------------------------------ model
class SegmentationNet(nn.Module):
    """A segmentation_models_pytorch U-Net split into ``encoder`` (pre-trained) and ``head`` (new).

    Args:
        unet: an ``smp.Unet`` (its encoder, decoder and segmentation head are taken over).
        pretrained_cfg: the encoder's input contract (``input_size``, ``mean``, ``std``);
            ``classifier`` is set to ``"head"``, so ``eval.strategies.head_prefix`` finds the new layers.
        card: how to rebuild the network (``load_segmentation_model``): encoder name and kwargs,
            classes, decoder widths.

    Shapes:
        ``(B, C, H, W)`` float, ``H`` and ``W`` multiples of 32 -> logits ``(B, K, H, W)``.
    """

    #: What ``serve.predictor.load_predictor`` dispatches on (a classifier has no ``task``).
    task = TASK

    def __init__(self, unet: nn.Module, pretrained_cfg: Any, card: dict[str, Any]):
        super().__init__()
        self.encoder = unet.encoder
        self.head = nn.ModuleDict({"decoder": unet.decoder, "segmentation_head": unet.segmentation_head})
        self.pretrained_cfg = pretrained_cfg.replace(classifier="head", num_classes=card["num_classes"])
        self.card = card

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, K, H, W)``; smp's ``Unet.forward`` without its classification branch."""
        if x.ndim != 4 or x.shape[-1] % SIZE_MULTIPLE or x.shape[-2] % SIZE_MULTIPLE:
            raise ValueError(f"expected (B, C, H, W) with H and W multiples of {SIZE_MULTIPLE}, got {tuple(x.shape)}")
        return self.head["segmentation_head"](self.head["decoder"](self.encoder(x)))


def _smp() -> ModuleType:
    """``segmentation_models_pytorch``, imported on first use (U-Net, Dice loss, pixel counts).

    Not at module import: it imports timm (seconds), and importing this module (the CLI, serve,
    classification fine-tuning) needs neither. ``tests/test_import_boundaries.py`` pins this.

    Raises:
        ImportError: it is not installed (a dependency of openmednet, so a partial install), with the fix.
    """
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise ImportError(
            f"segmentation needs segmentation-models-pytorch, which openmednet depends on but cannot import "
            f'here ({e}): pip install "segmentation-models-pytorch>=0.6" (or reinstall openmednet)'
        ) from e
    return smp


def _unet(card: dict[str, Any]) -> nn.Module:
    return _smp().Unet(f"tu-{card['encoder']}", encoder_weights=None, in_channels=card["in_chans"],
                    classes=card["num_classes"], decoder_channels=tuple(card["decoder_channels"]), **card["encoder_args"])


def _model_args(classifier: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """The kwargs the classifier was built with: MedNet's ``model_args()`` (its width), else the
    ones recorded in its ``pretrained_cfg.meta`` (timm baselines, ``openmednet.models._builder``)."""
    if hasattr(classifier, "model_args"):
        return dict(classifier.model_args())
    return dict(meta.get("model_args") or {})


def build_segmentation_model(init: str, num_classes: int, data_channels: int, arch: str | None = None) -> tuple[SegmentationNet, dict[str, Any]]:
    """A U-Net whose encoder starts from ``init`` (the classification grammar, ``build_init``).

    The init's classifier is built as for classification (so every init kind, error message and
    width rule is shared), turned into its timm ``features_only`` module, and its weights are
    loaded into the U-Net encoder that smp builds for the same timm architecture (strict: every
    tensor must match).

    Returns:
        ``(model, info)``: ``info`` as ``build_init``'s plus ``encoder`` and ``decoder``.

    Raises:
        KeyError, ValueError, FileNotFoundError: as ``build_init``; ValueError when the encoder
            built by smp does not match the init's features (an architecture smp cannot wrap).
    """
    from openmednet.eval.finetune import build_init

    classifier, info = build_init(init, 0, data_channels, arch)
    cfg = classifier.pretrained_cfg
    meta = dict(cfg.meta or {})
    encoder = (meta.get("timm_name") or meta.get("architecture") or info["architecture"]).split(".")[0]
    card = {"encoder": encoder, "in_chans": int(cfg.input_size[0]), "num_classes": int(num_classes),
            "decoder_channels": list(DECODER_CHANNELS),
            "encoder_args": {k: v for k, v in _model_args(classifier, meta).items() if k not in _HEAD_ARGS}}
    unet = _unet(card)
    features = to_features(classifier, out_indices=tuple(unet.encoder.model.feature_info.out_indices))
    try:
        unet.encoder.model.load_state_dict(features.state_dict(), strict=True)
    except RuntimeError as e:
        raise ValueError(f"init '{init}': smp's 'tu-{encoder}' encoder does not match the init's feature maps "
                         f"({str(e).splitlines()[0]}); use a MedNet or timm baseline init") from None
    info.update(encoder=f"tu-{encoder}", decoder="Unet", decoder_channels=list(DECODER_CHANNELS))
    return SegmentationNet(unet, cfg, card), info


def save_segmentation_model(model: SegmentationNet, out: Path, **card: Any) -> None:
    """``out/model.safetensors`` and ``out/model_card.json`` (the rebuild card plus ``card``).

    The card names the task (``"task": "segmentation"``, how ``openmednet predict``, ``serve`` and
    ``export`` tell a segmenter from a classifier) and the input contract: ``input_size`` (the
    run's), ``mean``/``std``, ``intensity`` and ``resize`` (``EvalInputs`` mode).
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    cfg = model.pretrained_cfg
    full = {"task": TASK, **model.card, "input_size": list(cfg.input_size), "mean": list(cfg.mean),
            "std": list(cfg.std), "intensity": "uint8/255", "resize": EVAL_RESIZE, **card}
    atomic_write_text(out / "model_card.json", json.dumps(full, indent=1) + "\n")


def _read_card(folder: Path) -> dict[str, Any] | None:
    """The segmentation card in ``folder``, or ``None`` when ``folder`` holds no such card."""
    path = folder / "model_card.json"
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(card, dict):
        return None
    # Cards written before "task" existed are recognised by their U-Net rebuild fields.
    return card if card.get("task") == TASK or {"encoder", "decoder_channels"} <= card.keys() else None


def is_segmentation_model(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model saved by ``save_segmentation_model`` (its card says so)."""
    return Path(folder).is_dir() and _read_card(Path(folder)) is not None


def load_segmentation_model(folder: str | Path) -> SegmentationNet:
    """Rebuild a fine-tuned ``SegmentationNet`` from ``save_segmentation_model``'s folder (offline).

    ``model.card`` is the saved card (``class_names``...), ``model.pretrained_cfg`` its input contract.

    Raises:
        FileNotFoundError: ``folder`` holds no segmentation model card or no weights.
        ValueError: the weights do not fit the card.
    """
    from safetensors.torch import load_file

    from openmednet.models import PretrainedCfg

    folder = Path(folder)
    card = _read_card(folder) if folder.is_dir() else None
    if card is None:
        raise FileNotFoundError(f"{folder} holds no segmentation model (model_card.json with \"task\": \"{TASK}\", "
                                f"written by `openmednet finetune --task segmentation --out RUN` as RUN/model)")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the segmentation model card has no weights next to it")
    names = tuple(card.get("class_names") or (f"class_{k}" for k in range(card["num_classes"])))
    cfg = PretrainedCfg(input_size=tuple(card["input_size"]), mean=tuple(card["mean"]), std=tuple(card["std"]),
                        label_names=names)
    model = SegmentationNet(_unet(card), cfg, card)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not fit its model card ({str(e).splitlines()[0]})") from None
    return model.eval()


def segmentation_inputs(contract: Any) -> EvalInputs:
    """The evaluation and prediction input pipeline of a segmentation model's contract.

    ``EvalInputs`` with ``resize=EVAL_RESIZE``: fine-tuning's validation and test images and
    ``openmednet predict`` / ``serve`` (``serve.segmenter``) all go through this one object.
    """
    return EvalInputs(contract, resize=EVAL_RESIZE)


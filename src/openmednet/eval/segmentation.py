"""Segmentation transfer: a U-Net on a pre-trained encoder, fine-tuned and tested once.

``openmednet finetune --task segmentation`` (``FinetuneConfig.task``) and a study with
``task: segmentation`` call ``run_segmentation``. It is the classification run with three parts
swapped, and nothing else copied::

    load_segmentation (image + mask pairs; strata as labels)           data.segmentation
      -> prepare_splits (group-aware stratified, label conflicts,       eval.finetune (shared)
         near-copies of test images left out of train/val)
      -> check_init_corpus (test images in the init's pre-training      eval.finetune (shared)
         corpus fingerprint)
      -> subsample_train (few-shot budget, per stratum)                  eval.splits (shared)
      -> build_init -> to_features -> U-Net encoder (weights copied)     here
      -> _train (train_one_epoch; early stopping, model choice on        eval.finetune (shared)
         validation foreground Dice; Dice + cross-entropy loss)
      -> ONE test evaluation: per-class Dice and IoU, bootstrap          here, resampling from
         intervals over images (patients where groups exist)             eval.metrics (shared)

Model: ``segmentation_models_pytorch.Unet("tu-<arch>")``, whose encoder is the init's timm
``features_only`` module (``openmednet.models.to_features``) with the init's weights: MedNet's
shipped weights, a pre-training run's folder, ``scratch:<arch>[.<tag>]`` or an ImageNet baseline
whose weights load offline (``efficientnet_lite0``); init strings are parsed by ``InitSpec`` via
``build_init``, exactly as for classification. ``SegmentationNet`` names the encoder ``encoder.*``
and the new decoder and 1x1 output convolution ``head.*``, so the head gets
``head_lr_mult`` x the learning rate as a classifier's new head does.

Evaluation inputs come from the one evaluation pipeline, ``engine.inputs.EvalInputs``, with
``resize="stretch"`` (``EVAL_RESIZE``: the whole image to ``S x S``, nothing cut off), the
pipeline ``openmednet predict`` and the web service apply to a segmentation model's inputs
(``serve.segmenter``). Scores are computed at each test image's stored resolution (the logits
are bilinearly upsampled to the mask's size before the argmax, ``upsample_logits``), not at the
network's input size:

- ``dice[k] = 2 TP / (2 TP + FP + FN)`` and ``iou[k] = TP / (TP + FP + FN)`` with the pixel counts
  summed over all test images (dataset-level: an image without class ``k`` contributes its false
  positives and nothing else; ``nan`` when class ``k`` is neither present nor predicted anywhere);
- ``dice_image[k]``: the mean over images of each image's Dice, where an image with class ``k``
  neither present nor predicted scores 1 (a correct "nothing there") — sensitive to false alarms
  on empty slices, which the dataset-level Dice hides;
- ``dice_mean``, ``iou_mean``, ``dice_image_mean``: means over the foreground classes (``k >= 1``).

Intervals: percentile bootstrap over test images, whole patients when groups exist
(``eval.metrics.bootstrap_resamples``, stratified by the strata), recomputed from the per-image
pixel counts.

Outputs in ``cfg.out``: ``config.yaml``, ``splits.csv``, ``history.json`` (as classification, with
``val_dice``), ``per_image.csv`` (per test image and class: TP, FP, FN, Dice; metrics.json is
recomputable from it), ``predictions/`` (the predicted masks as PNGs, class index = pixel value),
``metrics.json``, ``plots/learning_curves.png``, ``plots/overlays.png`` (ground truth vs
prediction on a few test images, ``mask_overlay``) and ``model/`` (``model.safetensors`` +
``model_card.json`` with ``"task": "segmentation"``, the run's input size and classes;
``load_segmentation_model``, ``is_segmentation_model``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from openmednet.config import save_config, to_dict
from openmednet.data.images import to_channels
from openmednet.data.segmentation import (
    SegmentationDataset,
    SegmentationSet,
    build_joint_transform,
    collate_eval,
    load_segmentation,
)
from openmednet.engine.inputs import EvalInputs
from openmednet.engine.trainer import LossOutput
from openmednet.eval import report
from openmednet.eval.metrics import bootstrap_resamples
from openmednet.models import to_features
from openmednet.utils import atomic_write_text, seed_everything

__all__ = [
    "SEGMENTATION_HEADLINE",
    "DiceCELoss",
    "SegmentationNet",
    "build_segmentation_model",
    "is_segmentation_model",
    "load_segmentation_model",
    "mask_overlay",
    "pixel_stats",
    "run_segmentation",
    "segmentation_inputs",
    "segmentation_metrics",
    "segmentation_scores",
    "upsample_logits",
]

logger = logging.getLogger(__name__)

#: Headline test metrics of a segmentation run (what a study summarises).
SEGMENTATION_HEADLINE = ("dice_mean", "iou_mean", "dice_image_mean")
#: U-Net decoder widths: half of smp's default (256, ..., 16); the CPU-scale encoders end at
#: 224 (MedNet, width 0.5) or 320 (EfficientNet-Lite0) channels.
DECODER_CHANNELS = (128, 64, 32, 16, 16)
#: smp's encoders halve the input five times.
SIZE_MULTIPLE = 32
#: Test images shown in ``plots/overlays.png``.
N_OVERLAYS = 6
#: ``EvalInputs`` resize of evaluation and prediction inputs: the whole field of view (a centre
#: crop would leave border pixels without a prediction).
EVAL_RESIZE = "stretch"
#: ``model_card.json["task"]`` of a saved segmentation model.
TASK = "segmentation"
#: Class colours (RGB) of prediction overlays, by class index - 1 (background is not drawn).
CLASS_COLOURS = ((255, 0, 0), (0, 120, 255), (255, 200, 0), (255, 0, 255), (0, 220, 220), (255, 128, 0))
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


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Logits ``(B, K, h, w)`` resized to an image's size ``(H, W)``: ``(B, K, H, W)`` float32.

    Bilinear on the logits (``align_corners=False``), then the caller takes the argmax: class
    boundaries fall between the network's pixels instead of following the blocky grid that a
    nearest-neighbour resize of the argmax gives. Fine-tuning's scores and ``openmednet predict``
    both map predictions back to the image this way.
    """
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------ loss, metrics
class DiceCELoss(nn.Module):
    """Soft Dice (smp's ``DiceLoss``, multiclass, classes absent from the batch skipped) plus
    cross-entropy, both on logits: ``(B, K, H, W)`` logits and ``(B, H, W)`` int64 masks -> scalar.

    Cross-entropy gives every pixel a gradient from the start; Dice counters the imbalance of a
    small lesion against a large background (the nnU-Net default pairing).
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = _smp().losses.DiceLoss(mode="multiclass", from_logits=True)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = logits.float()
        return self.dice(logits, target) + F.cross_entropy(logits, target)


def pixel_stats(pred: Tensor, target: Tensor, num_classes: int) -> np.ndarray:
    """``(3, K)`` int64 pixel counts ``[TP, FP, FN]`` per class of one ``(H, W)`` prediction
    (smp.metrics.get_stats, multiclass)."""
    tp, fp, fn, _ = _smp().metrics.get_stats(pred[None].long(), target[None].long(), mode="multiclass", num_classes=num_classes)
    return torch.stack([tp[0], fp[0], fn[0]]).numpy().astype(np.int64)


def segmentation_scores(stats: np.ndarray) -> dict[str, np.ndarray | float]:
    """Dice/IoU from ``(N, 3, K)`` per-image ``[TP, FP, FN]`` counts (module docstring).

    Returns:
        ``{"dice", "iou", "dice_image"}`` ``(K,)`` arrays and the foreground means
        ``dice_mean``, ``iou_mean``, ``dice_image_mean``.
    """
    tp, fp, fn = stats.sum(0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * tp / (2 * tp + fp + fn)
        iou = tp / (tp + fp + fn)
        t, p, n = stats[:, 0].astype(np.float64), stats[:, 1].astype(np.float64), stats[:, 2].astype(np.float64)
        denom = 2 * t + p + n
        per_image = np.where(denom > 0, 2 * t / np.where(denom > 0, denom, 1), 1.0)
    dice_image = per_image.mean(0)
    fg = slice(1, None)
    with np.errstate(invalid="ignore"):
        means = {f"{k}_mean": float(np.nanmean(v[fg])) if np.isfinite(v[fg]).any() else float("nan")
                 for k, v in (("dice", dice), ("iou", iou), ("dice_image", dice_image))}
    return {"dice": dice, "iou": iou, "dice_image": dice_image, **means}


def segmentation_metrics(stats: np.ndarray, class_names: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
                         strata: Sequence[Any] | None = None, groups: Sequence[Any] | None = None,
                         confidence: float = 0.95) -> dict[str, Any]:
    """Test metrics with percentile-bootstrap intervals over images (patients when ``groups``).

    Args:
        stats: ``(N, 3, K)`` per-image ``[TP, FP, FN]``.
        class_names: ``K`` names, 0 = background.
        n_boot: resamples (0 = no intervals).
        seed: bootstrap seed.
        strata: ``(N,)`` strata the resamples keep the counts of (``SegmentationSet.labels``).
        groups: ``(N,)`` patient ids.

    Returns:
        ``{"n", "dice_mean", "iou_mean", "dice_image_mean", "per_class": {name: {"dice", "iou",
        "dice_image", "pixels"}}, "class_names", "ci": {metric or "dice/<class>", "iou/<class>":
        {"low", "high"}, "_meta"}}``.
    """
    point = segmentation_scores(stats)
    out: dict[str, Any] = {"n": int(len(stats)), **{m: point[m] for m in SEGMENTATION_HEADLINE}}
    pixels = (stats[:, 0] + stats[:, 2]).sum(0)  # ground-truth pixels per class (TP + FN)
    out["per_class"] = {name: {"dice": float(point["dice"][k]), "iou": float(point["iou"][k]),
                               "dice_image": float(point["dice_image"][k]), "pixels": int(pixels[k])}
                        for k, name in enumerate(class_names)}
    out["class_names"] = list(class_names)
    if n_boot > 0:
        codes = np.unique(np.asarray(strata if strata is not None else np.zeros(len(stats)), dtype=str), return_inverse=True)[1]
        method, resamples = bootstrap_resamples(codes, n_boot, seed, groups)
        names = list(SEGMENTATION_HEADLINE) + [f"{m}/{c}" for c in class_names[1:] for m in ("dice", "iou")]
        values = np.empty((n_boot, len(names)))
        for b, idx in enumerate(resamples):
            s = segmentation_scores(stats[idx])
            values[b] = [s[m] for m in SEGMENTATION_HEADLINE] + [
                s[m][k] for k in range(1, len(class_names)) for m in ("dice", "iou")]
        with np.errstate(invalid="ignore"):
            lo, hi = np.nanquantile(values, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
        out["ci"] = {n: {"low": float(lo[i]), "high": float(hi[i])} for i, n in enumerate(names)}
        out["ci"]["_meta"] = {"n_boot": n_boot, "seed": seed, "confidence": confidence, "method": method}
    return out


@torch.no_grad()
def predict_masks(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
                  loss_fn: nn.Module | None = None) -> tuple[np.ndarray, list[np.ndarray], float]:
    """Predict every image of an evaluation loader at its mask's stored resolution.

    Returns:
        ``(stats (N, 3, K), predicted uint8 masks, mean loss)`` (loss ``nan`` without ``loss_fn``).
    """
    was_training = model.training
    model.eval()
    stats, preds, losses = [], [], []
    for x, masks in loader:
        logits = model(x.to(device)).float()
        for i, mask in enumerate(masks):
            up = upsample_logits(logits[i:i + 1], tuple(mask.shape))
            pred = up.argmax(1)[0].cpu()
            if loss_fn is not None:
                losses.append(float(loss_fn(up, mask[None].to(device))))
            stats.append(pixel_stats(pred, mask, num_classes))
            preds.append(pred.numpy().astype(np.uint8))
    model.train(was_training)
    return np.stack(stats), preds, float(np.mean(losses)) if losses else float("nan")


# ------------------------------------------------------------------------------------ outputs
def _write_per_image(out: Path, ids: list[str], stats: np.ndarray, class_names: Sequence[str]) -> None:
    from openmednet.eval.finetune._outputs import _write_csv

    rows = []
    for i, image_id in enumerate(ids):
        t, p, n = stats[i]
        for k, name in enumerate(class_names):
            denom = 2 * t[k] + p[k] + n[k]
            rows.append([image_id, name, int(t[k]), int(p[k]), int(n[k]), repr(float(2 * t[k] / denom)) if denom else "1.0"])
    _write_csv(out / "per_image.csv", ["id", "class", "tp", "fp", "fn", "dice"], rows)


def _write_predictions(out: Path, ids: list[str], preds: list[np.ndarray]) -> None:
    from PIL import Image

    folder = (out / "predictions").resolve()
    for image_id, pred in zip(ids, preds):
        rel = Path(image_id)
        if rel.is_absolute() or ".." in rel.parts:  # an id from a manifest path outside the folder
            rel = Path("".join(c if c.isalnum() or c in "._-" else "_" for c in image_id))
        path = (folder / rel).with_suffix(".png")
        if not path.is_relative_to(folder):  # never write next to the data
            raise ValueError(f"prediction path {path} escapes {folder}")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred).save(path)


def mask_overlay(image: np.ndarray, mask: np.ndarray, colours: Sequence[tuple[int, int, int]] = CLASS_COLOURS,
                 alpha: float = 0.45) -> np.ndarray:
    """The image with each foreground class blended in its colour: uint8 ``(H, W, 3)``.

    Args:
        image: uint8 ``(H, W)`` or ``(H, W, 3)``.
        mask: ``(H, W)`` class indices, the image's size; 0 (background) is left as is.
        colours: RGB per class ``1, 2, ...`` (cycled when there are more classes).
        alpha: weight of the class colour.

    Raises:
        ValueError: the mask's size differs from the image's.
    """
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} differ in size")
    rgb = (image if image.ndim == 3 else np.stack([image] * 3, -1)).astype(np.float32)
    for k in np.unique(mask[mask > 0]).tolist():
        where = mask == k
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(colours[(k - 1) % len(colours)], np.float32)
    return np.round(rgb).astype(np.uint8)


def plot_overlays(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                  titles: Sequence[str], path: Path) -> Path:
    """One row per image: the image, ground truth (green) and prediction (class colours) over it
    (``mask_overlay``, the overlay ``openmednet predict`` writes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 2.5 * len(images)))
    axes = np.asarray(fig.subplots(len(images), 3, squeeze=False))
    for row, (img, mask, pred, title) in enumerate(zip(images, masks, preds, titles)):
        layers = (img if img.ndim == 3 else np.stack([img] * 3, -1), mask_overlay(img, mask, [(0, 255, 0)]),
                  mask_overlay(img, pred))
        for col, (shown, name) in enumerate(zip(layers, ("image", "ground truth", "prediction"))):
            ax = axes[row, col]
            ax.imshow(shown, interpolation="nearest")
            ax.set_title(f"{name}" + (f"\n{title}" if col == 0 else ""), fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return report.save_figure(fig, path)


def _overlay_choice(test: SegmentationSet, stats: np.ndarray) -> list[int]:
    """Up to ``N_OVERLAYS`` test images, spread over the strata (deterministic: sorted ids)."""
    order = sorted(range(len(test)), key=lambda i: test.ids[i])
    chosen: list[int] = []
    by_stratum = {s: [i for i in order if test.labels[i] == s] for s in sorted(set(test.labels.tolist()))}
    while len(chosen) < min(N_OVERLAYS, len(test)):
        for members in by_stratum.values():
            if members and len(chosen) < N_OVERLAYS:
                chosen.append(members.pop(0))
    return chosen


# ------------------------------------------------------------------------------------ run
def _check_config(cfg: Any) -> None:
    if cfg.strategy != "full":
        raise ValueError(f"task segmentation fine-tunes the whole U-Net (strategy full), got strategy '{cfg.strategy}'")
    if getattr(cfg, "semi", "none") != "none":
        raise ValueError(f"task segmentation has no semi-supervised mode yet, got semi '{cfg.semi}'")


def segmentation_inputs(contract: Any) -> EvalInputs:
    """The evaluation and prediction input pipeline of a segmentation model's contract.

    ``EvalInputs`` with ``resize=EVAL_RESIZE``: fine-tuning's validation and test images and
    ``openmednet predict`` / ``serve`` (``serve.segmenter``) all go through this one object.
    """
    return EvalInputs(contract, resize=EVAL_RESIZE)


def _eval_pair(inputs: EvalInputs) -> Any:
    """``(prepared uint8 image, mask)`` -> ``(EvalInputs.normalize(image), int64 mask)`` (mask as stored)."""
    def apply(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        image, mask = pair
        return inputs.normalize(image.as_subclass(Tensor)), mask.as_subclass(Tensor).long()

    return apply


def _make_loaders(cfg: Any, target: SegmentationSet, idx: dict[str, np.ndarray], model: SegmentationNet,
                  channels: int, size: int) -> dict[str, DataLoader]:
    """Augmented train loader (joint transform, seeded per position) and val/test loaders.

    Validation and test images are prepared once by ``segmentation_inputs`` (as ``openmednet
    predict`` prepares a file) and keep their masks at the stored resolution.
    """
    from openmednet.eval.finetune import split_loader

    inputs = segmentation_inputs(model.pretrained_cfg)  # the run's contract (run_segmentation)
    augment = build_joint_transform(model.pretrained_cfg.mean, model.pretrained_cfg.std, size, hflip=cfg.hflip,
                                    color=channels == 3 and target.channels == 3)
    loaders = {}
    for name, train in (("train", True), ("val", False), ("test", False)):
        images = [to_channels(target.images[i], channels)[0] if train else inputs.prepare(target.images[i])[0]
                  for i in idx[name]]
        ds = SegmentationDataset(images, [target.masks[i] for i in idx[name]], augment if train else _eval_pair(inputs))
        loaders[name] = split_loader(ds, cfg, train, **({} if train else {"collate_fn": collate_eval}))
    return loaders


def run_segmentation(cfg: Any, target: SegmentationSet | None = None) -> Any:
    """Fine-tune a U-Net and test it once (see the module docstring); returns a ``FinetuneResult``.

    Args:
        cfg: a ``FinetuneConfig`` with ``task="segmentation"`` (``strategy`` must be ``full``).
        target: the already decoded ``cfg.data`` (a study decodes each target once).

    Raises:
        FileNotFoundError, KeyError, ValueError: bad data, init or configuration.
    """
    from openmednet.eval.finetune import (
        FinetuneResult,
        _place_model,
        _split_run,
        _train,
        check_input_contract,
        prepare_for_transfer,
        run_contract,
    )

    _check_config(cfg)
    seed_everything(cfg.seed)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if target is None:
        target = load_segmentation(cfg.data, max_side=cfg.max_side)
    target, splits, idx, dropped, pretraining = _split_run(cfg, target, out)

    torch.manual_seed(cfg.seed)  # the decoder's initialisation
    k = len(target.class_names)
    model, info = build_segmentation_model(cfg.init, k, target.channels, cfg.arch)
    channels, size = check_input_contract(model, target.channels, cfg.image_size)
    if size % SIZE_MULTIPLE:
        raise ValueError(f"image_size {size} is not a multiple of {SIZE_MULTIPLE} (the U-Net halves it 5 times): use e.g. "
                         f"{max(SIZE_MULTIPLE, round(size / SIZE_MULTIPLE) * SIZE_MULTIPLE)}")
    # The run's contract, which the saved card records: the card used to keep the init's size.
    model.pretrained_cfg = run_contract(model, channels, size)
    info.update(prepare_for_transfer(model), input_size=[channels, size, size],
                mean=list(model.pretrained_cfg.mean), std=list(model.pretrained_cfg.std))
    dist, precision, channels_last = _place_model(cfg, model, info)
    loaders = _make_loaders(cfg, target, idx, model, channels, size)
    loss_fn = DiceCELoss()

    def compute_loss(m: nn.Module, batch: tuple[Tensor, Tensor]) -> LossOutput:
        x, y = batch
        return LossOutput(loss_fn(m(x), y), n=len(y))

    def val_score(m: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        stats, _, loss = predict_masks(m, loader, device, k, loss_fn)
        return {"val_dice": segmentation_scores(stats)["dice_mean"], "val_loss": loss}

    history, best_epoch = _train(model, loaders, cfg, None, dist, precision, channels_last,
                                 loss_fn=compute_loss, val_score=val_score)
    atomic_write_text(out / "history.json", json.dumps(history, indent=1) + "\n")

    # The only time the test split is looked at.
    stats, preds, _ = predict_masks(model, loaders["test"], dist.device, k)
    test_set = target.subset(idx["test"])
    _write_per_image(out, test_set.ids, stats, target.class_names)
    _write_predictions(out, test_set.ids, preds)
    test = segmentation_metrics(stats, target.class_names, n_boot=cfg.n_boot, seed=cfg.seed,
                                strata=test_set.labels, groups=test_set.groups)
    report.plot_learning_curves(history, out / "plots" / "learning_curves.png", best_epoch, score="val_dice",
                                score_label="foreground Dice", loss_label="Dice + cross-entropy")
    shown = _overlay_choice(test_set, stats)
    plot_overlays([test_set.images[i] for i in shown], [test_set.masks[i] for i in shown], [preds[i] for i in shown],
                  [f"{Path(test_set.ids[i]).name}  Dice {segmentation_scores(stats[i:i + 1])['dice_image_mean']:.2f}" for i in shown],
                  out / "plots" / "overlays.png")

    best = next(h for h in history if h["epoch"] == best_epoch)
    counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
    metrics = {
        "task": "segmentation",
        "test": test,
        "val": {"dice_mean": best["val_dice"], "loss": best["val_loss"]},
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "test_leaked_in_pretraining": bool(pretraining and pretraining["test_ids_in_corpus"]),
        "data": {
            "root": str(cfg.data), "n_images": len(target), "channels": target.channels,
            "class_names": list(target.class_names), "label_names": list(target.label_names),
            "counts": {**{s: _stratum_counts(target, splits == s) for s in counts},
                       "train_used": _stratum_counts(target, np.isin(np.arange(len(target)), idx["train"]))},
            "dropped": dropped, "skipped": target.skipped, "pretraining_leakage": pretraining,
        },
        "model": info,
        "config": to_dict(cfg),
    }
    save_segmentation_model(model.cpu(), out / "model", init=cfg.init, class_names=list(target.class_names),
                            data=str(cfg.data), epochs=best_epoch, metrics={m: test[m] for m in SEGMENTATION_HEADLINE})
    # metrics.json is the completion marker a study resumes by: written last, after the model.
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, allow_nan=True) + "\n")
    logger.info("test foreground Dice %.4f (best epoch %d); outputs in %s", test["dice_mean"], best_epoch, out)
    return FinetuneResult(out=out, metrics=metrics)


def _stratum_counts(target: SegmentationSet, keep: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(target.labels[keep].astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}

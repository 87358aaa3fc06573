"""Segmentation loss and scores: Dice + cross-entropy, per-image pixel counts, Dice/IoU with intervals.

The definitions are in the docstring of ``openmednet.eval.segmentation``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from openmednet.eval.metrics import bootstrap_resamples
from openmednet.eval.segmentation._model import _smp

__all__ = ["SEGMENTATION_HEADLINE", "DiceCELoss", "pixel_stats", "predict_masks", "segmentation_metrics",
           "segmentation_scores", "upsample_logits"]

#: Headline test metrics of a segmentation run (what a study summarises).
SEGMENTATION_HEADLINE = ("dice_mean", "iou_mean", "dice_image_mean")


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Logits ``(B, K, h, w)`` resized to an image's size ``(H, W)``: ``(B, K, H, W)`` float32.

    Bilinear on the logits (``align_corners=False``), then the caller takes the argmax: class
    boundaries fall between the network's pixels instead of following the blocky grid that a
    nearest-neighbour resize of the argmax gives. Fine-tuning's scores and ``openmednet predict``
    both map predictions back to the image this way.
    """
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)



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


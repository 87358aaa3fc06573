"""What a segmentation run writes besides the classification files: per-image counts, mask PNGs, overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openmednet.data.segmentation import SegmentationSet
from openmednet.eval import report

__all__ = ["CLASS_COLOURS", "N_OVERLAYS", "mask_overlay", "plot_overlays"]

#: Test images shown in ``plots/overlays.png``.
N_OVERLAYS = 6
#: Class colours (RGB) of prediction overlays, by class index - 1 (background is not drawn).
CLASS_COLOURS = ((255, 0, 0), (0, 120, 255), (255, 200, 0), (255, 0, 255), (0, 220, 220), (255, 128, 0))


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

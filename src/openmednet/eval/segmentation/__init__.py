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

Modules (one concern each): ``_model`` (``SegmentationNet``, building, saving and loading it, its
input pipeline), ``_metrics`` (loss, pixel counts, Dice/IoU with intervals, mask prediction) and
``_outputs`` (per-image counts, mask PNGs, overlays); ``run_segmentation`` composes them here.

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

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

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
from openmednet.eval.segmentation._metrics import (
    SEGMENTATION_HEADLINE,
    DiceCELoss,
    pixel_stats,
    predict_masks,
    segmentation_metrics,
    segmentation_scores,
    upsample_logits,
)
from openmednet.eval.segmentation._model import (
    DECODER_CHANNELS,
    EVAL_RESIZE,
    SIZE_MULTIPLE,
    TASK,
    SegmentationNet,
    build_segmentation_model,
    is_segmentation_model,
    load_segmentation_model,
    save_segmentation_model,
    segmentation_inputs,
)
from openmednet.eval.segmentation._outputs import (
    CLASS_COLOURS,
    N_OVERLAYS,
    _overlay_choice,
    _write_per_image,
    _write_predictions,
    mask_overlay,
    plot_overlays,
)

__all__ = [
    "CLASS_COLOURS",
    "DECODER_CHANNELS",
    "EVAL_RESIZE",
    "N_OVERLAYS",
    "SEGMENTATION_HEADLINE",
    "SIZE_MULTIPLE",
    "TASK",
    "DiceCELoss",
    "SegmentationNet",
    "build_segmentation_model",
    "is_segmentation_model",
    "load_segmentation_model",
    "mask_overlay",
    "pixel_stats",
    "plot_overlays",
    "predict_masks",
    "run_segmentation",
    "save_segmentation_model",
    "segmentation_inputs",
    "segmentation_metrics",
    "segmentation_scores",
    "upsample_logits",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ run
def _check_config(cfg: Any) -> None:
    if cfg.strategy != "full":
        raise ValueError(f"task segmentation fine-tunes the whole U-Net (strategy full), got strategy '{cfg.strategy}'")
    if getattr(cfg, "semi", "none") != "none":
        raise ValueError(f"task segmentation has no semi-supervised mode yet, got semi '{cfg.semi}'")


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
    from openmednet.eval.finetune._data import split_loader

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
        check_input_contract,
        prepare_for_transfer,
        run_contract,
    )
    from openmednet.eval.finetune._data import _split_run
    from openmednet.eval.finetune._fit import _train
    from openmednet.eval.finetune._model import _place_model
    from openmednet.eval.finetune._outputs import (
        finish_run,
        run_metrics,
        start_run,
        write_history,
    )

    _check_config(cfg)
    out = start_run(cfg)
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
    write_history(out, history)

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

    counts = {s: _stratum_counts(target, splits == s) for s in ("train", "val", "test")}
    counts["train_used"] = _stratum_counts(target, np.isin(np.arange(len(target)), idx["train"]))
    metrics = {"task": TASK, **run_metrics(
        cfg, target, test=test, val_score=("dice_mean", "val_dice"), history=history, best_epoch=best_epoch,
        names={"class_names": list(target.class_names), "label_names": list(target.label_names)}, counts=counts,
        dropped=dropped, pretraining=pretraining, model=info)}
    save_segmentation_model(model.cpu(), out / "model", init=cfg.init, class_names=list(target.class_names),
                            data=str(cfg.data), epochs=best_epoch, metrics={m: test[m] for m in SEGMENTATION_HEADLINE})
    logger.info("test foreground Dice %.4f (best epoch %d); outputs in %s", test["dice_mean"], best_epoch, out)
    return finish_run(out, metrics)  # metrics.json last, after the model


def _stratum_counts(target: SegmentationSet, keep: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(target.labels[keep].astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}

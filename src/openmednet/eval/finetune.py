"""Fine-tune a model on a small labelled target and evaluate it once on an untouched test split.

``run_finetune(FinetuneConfig)`` is the composition root of a transfer run::

    data -> checks -> splits (given, else group-aware stratified, fixed split seed)
         -> leakage checks (groups; label conflicts; near-copies of test images in train/val)
         -> few-shot subset of train (run seed) -> model init -> strategy
         -> train, early stopping and model choice on validation macro AUROC
         -> best weights -> ONE evaluation on test -> metrics.json, predictions.csv, plots, model/

Outputs in ``cfg.out``:

================== ==========================================================================
config.yaml        the resolved ``FinetuneConfig``
splits.csv         every item kept: id, label, group, split, used in training, perceptual hash
                   (items left out by the checks are listed in metrics.json, data.dropped)
history.json       per epoch: train loss, validation loss and AUROC, learning rate
predictions.csv    test ids, labels and class probabilities (metrics.json is recomputable from it)
metrics.json       test metrics with bootstrap 95% intervals, best epoch, data counts, dropped items
plots/             learning_curves.png, confusion_matrix.png, roc.png, reliability.png
model/             ``save_pretrained`` output: weights + model card with label names and the
                   input contract, loadable with ``openmednet.load_pretrained``
================== ==========================================================================

Init (``cfg.init``, parsed by ``openmednet.models.InitSpec``, the one parser of this grammar):

- ``"auto"``: pre-trained ``mednet_gray`` or ``mednet_color``, chosen by the data's channels (1 or 3);
- a registered name (``"mednet_gray"``, ``"efficientnet_lite0"``, ``"resnet50"``, ``"arch.tag"``):
  its pre-trained weights (offline where they ship; else a clear error);
- ``"scratch:<arch>"``: random initialisation of a registered architecture;
  ``"scratch:<arch>.<tag>"``: the same, built with that weight set's architecture arguments
  (``width_mult``...), so it matches the pre-trained init in capacity;
- a path: a directory written by ``save_pretrained`` or its model card (``.json``), or a bare
  weights file together with ``cfg.arch``. An existing path wins over a registered name.

Input contract: the model's ``pretrained_cfg`` decides channels, size and normalisation. Gray data
fed to a 3-channel init is repeated to 3 channels; colour data fed to a 1-channel init is converted
to luma. Both are warned, never silent.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from openmednet._errors import look_up_option
from openmednet.config import save_config, to_dict
from openmednet.data.datasets import LabelledDataset
from openmednet.data.loader import build_loader
from openmednet.data.transforms import build_transform
from openmednet.engine.callbacks import EarlyStopping
from openmednet.engine.distributed import DistEnv
from openmednet.engine.inputs import EvalInputs
from openmednet.engine.loop import fit
from openmednet.engine.optim import OPTIMIZERS, build_optimizer, build_scheduler
from openmednet.engine.precision import resolve_precision
from openmednet.engine.trainer import PRECISIONS, LossOutput
from openmednet.eval import report
from openmednet.eval.leakage import (
    check_pretraining_leakage,
    shipped_corpus_fingerprint,
)
from openmednet.eval.metrics import BOOTSTRAP_METRICS, evaluate_predictions
from openmednet.eval.splits import (
    check_group_leakage,
    find_label_conflicts,
    find_near_duplicates,
    make_splits,
    subsample_train,
)
from openmednet.eval.strategies import STRATEGIES, apply_strategy, head_prefix
from openmednet.eval.targets import TargetSet, load_target
from openmednet.models import (
    InitSpec,
    WeightsUnavailableError,
    create_model,
    get_pretrained_cfg,
    load_pretrained,
    save_pretrained,
)
from openmednet.utils import atomic_write_text, seed_everything

__all__ = ["FinetuneConfig", "FinetuneResult", "build_init", "check_init_corpus", "check_input_contract", "predict_proba", "prepare_for_transfer", "prepare_splits", "run_contract",
           "run_finetune", "training_device"]

logger = logging.getLogger(__name__)

LEAKAGE_POLICIES = ("drop", "error")
#: ``classification`` (labels.csv targets) or ``segmentation`` (masks.csv targets, ``eval.segmentation``).
TASKS = ("classification", "segmentation")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run needs; stops at ``run_finetune`` (the composition root).

    Attributes:
        data: target folder (labels.csv or class sub-folders), ``.npz``, or CSV folder.
        out: run directory (created).
        init: see the module docstring.
        arch: architecture of a bare weights file given as ``init``.
        strategy: ``full``, ``linear_probe``, ``freeze_k`` or ``meanvar``.
        freeze_k: blocks frozen after the stem for ``freeze_k``.
        epochs: maximum epochs.
        patience: stop after this many epochs without a better validation score.
        min_epochs: warm-up epochs that model choice and patience ignore (their validation scores
            are still logged); see ``engine.callbacks.EarlyStopping``. 0 (default): choose from epoch 1.
        batch_size: images per step.
        lr: learning rate of the backbone (the survey found 1e-4 -> 1e-5 steadier for big nets).
        head_lr_mult: learning-rate multiplier of the new head (MedNet's authors: 10x).
        weight_decay: decay of conv/linear weights.
        optimizer: ``adamw``, ``sgd`` or ``lars``.
        warmup_epochs: linear warm-up before the cosine decay.
        image_size: input side; ``None`` uses the init's contract.
        class_weighted: weight the loss by inverse class frequency (sklearn's "balanced").
        label_fraction: train on this fraction of each class of the train split.
        per_class: or on exactly this many images per class (few-shot).
        seed: run seed (few-shot subset, init of the head, data order, augmentation).
        given_splits: use the source's train/val/test column; ``False`` draws new splits (e.g. for
            Open-i, whose given test split has 2 images).
        split_seed: seed of drawn splits; keep it fixed across runs of one study.
        val_fraction, test_fraction: sizes of drawn validation / test splits.
        leakage: what to do with train/val images that are near-copies of test images:
            ``drop`` them (test stays untouched) or raise (``error``). Test images found in the
            init's pre-training corpus cannot be dropped (the test split is never changed to suit
            an init): ``drop`` then warns and sets ``metrics["test_leaked_in_pretraining"]``,
            ``error`` raises; ``openmednet study`` refuses such inits.
        near_threshold: pHash bits within which two images are near-copies.
        hflip: random horizontal flips (turn off for laterality labels).
        n_boot: bootstrap resamples for the test intervals (0 = none).
        format, csv_file, columns, label_map, classes: how to read ``data`` (see ``load_target``).
        max_side: shorter-side cap of images kept in memory; keep it >= the input size (raise it
            to 299 or more for InceptionV3), or images are upsampled from this size.
        precision: ``auto`` (bf16 where the CPU/GPU runs it natively, else fp32; see
            ``openmednet.engine.precision``), ``fp32``, ``bf16`` (CPU or GPU; warned where
            emulated, about 9x slower than fp32 on an AVX2-only CPU) or ``fp16`` (GPU) for
            training; evaluation (validation and test) always runs in fp32. The resolved value is
            recorded in ``metrics.json`` (``model.precision``).
        channels_last: feed training batches in NHWC memory format; ``None`` follows the resolved
            precision (on with bf16). With ``bf16`` on a CPU with AVX512-BF16, a MedNet run is 1.6x
            faster; EfficientNet-Lite0 is 0.87x, i.e. slower (docs/benchmarks.md, "Fine-tuning
            precision").
        num_workers: DataLoader worker processes.
        device: ``cpu``, ``cuda`` or ``None`` (CUDA if available).
        task: ``classification`` or ``segmentation`` (``data`` holds masks.csv + classes.txt; a
            U-Net on the init's encoder, see ``openmednet.eval.segmentation``; strategy ``full``).
        semi: ``none``, ``pseudo_label`` or ``fixmatch``; ``unlabelled`` (folders, or
            ``rest_of_train``), ``rounds``, ``semi_threshold``, ``pseudo_selection``,
            ``pseudo_fraction``, ``student_dropout``, ``mu``, ``lambda_u``, ``strong_magnitude``,
            ``max_unlabelled``: semi-supervised fine-tuning, see ``openmednet.eval.semi``.
    """

    data: Path
    out: Path
    init: str = "auto"
    arch: str | None = None
    strategy: str = "full"
    freeze_k: int = 0
    epochs: int = 40
    patience: int = 10
    min_epochs: int = 0
    batch_size: int = 32
    lr: float = 1e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    warmup_epochs: int = 1
    image_size: int | None = None
    class_weighted: bool = True
    label_fraction: float | None = None
    per_class: int | None = None
    seed: int = 0
    given_splits: bool = True
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    leakage: str = "drop"
    near_threshold: int = 6
    hflip: bool = True
    n_boot: int = 1000
    format: str = "auto"
    csv_file: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    label_map: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None
    max_side: int | None = 256
    precision: str = "auto"
    channels_last: bool | None = None
    num_workers: int = 0
    device: str | None = None
    task: str = "classification"
    semi: str = "none"
    unlabelled: tuple[str, ...] = ()
    rounds: int = 1
    semi_threshold: float = 0.95
    pseudo_selection: str = "class_balanced"
    pseudo_fraction: float = 0.5
    student_dropout: float = 0.5
    mu: int = 2
    lambda_u: float = 1.0
    strong_magnitude: int = 9
    max_unlabelled: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        look_up_option(self.strategy, STRATEGIES, "strategy")
        look_up_option(self.task, TASKS, "task")
        look_up_option(self.leakage, LEAKAGE_POLICIES, "leakage policy")
        look_up_option(self.precision, PRECISIONS, "precision")
        look_up_option(self.optimizer, OPTIMIZERS, "optimizer")
        from openmednet.eval.semi import check_semi_config

        check_semi_config(self)
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError(f"epochs, patience and batch_size must be >= 1, got {self.epochs}, {self.patience}, {self.batch_size}")
        if not 0 <= self.min_epochs < self.epochs:
            raise ValueError(f"min_epochs must be in [0, epochs) so that some epoch can be chosen, got min_epochs="
                             f"{self.min_epochs} with epochs={self.epochs}")
        if self.freeze_k < 0 or self.warmup_epochs < 0 or self.num_workers < 0:
            raise ValueError(f"freeze_k, warmup_epochs and num_workers must be >= 0, got "
                             f"{self.freeze_k}, {self.warmup_epochs}, {self.num_workers}")
        if self.label_fraction is not None and self.per_class is not None:
            raise ValueError("give label_fraction or per_class, not both")
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must lie in (0, 1], got {self.label_fraction}")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {self.per_class}")


@dataclass
class FinetuneResult:
    """What ``run_finetune`` produced: the run directory and the content of ``metrics.json``."""

    out: Path
    metrics: dict[str, Any]


# ------------------------------------------------------------------------------------ data
def prepare_splits(target: TargetSet, cfg: FinetuneConfig) -> tuple[TargetSet, np.ndarray, dict[str, list[str]]]:
    """Clean the target and split it: returns ``(target, splits, dropped)``.

    1. Images that are (perceptually) identical but carry different labels are dropped: their
       true label is unknown (BUSI's ``malignant (145)`` = ``benign (433)``).
    2. Splits: given, else drawn by group and class with ``cfg.split_seed``; no group in two splits.
    3. Train/val images that are near-copies of a test image are dropped (or refused), so the test
       split measures images the model has never seen in any form.

    Returns:
        The cleaned target, its ``(N,)`` split names, and ``{"label_conflicts": ids,
        "near_copies_of_test": ids}`` of the dropped items.
    """
    dropped: dict[str, list[str]] = {"label_conflicts": [], "near_copies_of_test": []}
    conflicts = [i for cluster in find_label_conflicts(target.hashes, target.labels, fine=target.fine_hashes) for i in cluster]
    if conflicts:
        dropped["label_conflicts"] = [target.ids[i] for i in conflicts]
        warnings.warn(
            f"{len(conflicts)} identical images carry different labels and are left out: "
            f"{dropped['label_conflicts'][:4]}", stacklevel=2,
        )
        target = target.subset(np.setdiff1d(np.arange(len(target)), conflicts))
    splits = make_splits(
        target.labels, target.groups, target.given_splits if cfg.given_splits else None,
        val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
    )
    check_group_leakage(target.groups, splits)
    test = np.flatnonzero(splits == "test")
    seen = np.flatnonzero(splits != "test")
    pairs = find_near_duplicates(
        target.hashes[test], target.hashes[seen], cfg.near_threshold,
        query_fine=target.fine_hashes[test], reference_fine=target.fine_hashes[seen],
    )
    if pairs:
        copies = sorted({int(seen[j]) for _, j, _ in pairs})
        examples = [f"{target.ids[test[i]]} ~ {target.ids[seen[j]]} ({d} bits)" for i, j, d in pairs[:3]]
        if cfg.leakage == "error":
            raise ValueError(
                f"{len(copies)} training/validation images are near-copies of test images (e.g. {examples}): "
                f"the test score would be inflated. Fix the splits, or set leakage='drop' to leave them out"
            )
        warnings.warn(
            f"left out {len(copies)} training/validation images that are near-copies of test images "
            f"(within {cfg.near_threshold} of 64 pHash bits, confirmed by the 256-bit hash), e.g. {examples}",
            stacklevel=2,
        )
        dropped["near_copies_of_test"] = [target.ids[i] for i in copies]
        keep = np.setdiff1d(np.arange(len(target)), copies)
        target, splits = target.subset(keep), splits[keep]
    missing = sorted(set(target.label_names) - set(target.labels[splits == "train"].tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no training image after the leakage checks; add images")
    present = set(target.labels[splits == "val"].tolist())
    missing = sorted(set(target.label_names) - present)
    if len(present) < 2:
        warnings.warn(f"the validation split holds only {sorted(present)}: validation AUROC is undefined, so "
                      f"epochs are chosen on validation loss alone; draw splits (given_splits=false) or add images",
                      stacklevel=2)
    elif missing:
        # Validation AUROC then averages over the classes present; rare classes of tiny targets
        # (BCCD basophils) may simply not reach the validation split.
        warnings.warn(f"classes {missing} have no validation image: model choice ignores them", stacklevel=2)
    return target, splits, dropped


def check_init_corpus(cfg: FinetuneConfig, target: TargetSet, splits: np.ndarray) -> dict[str, Any] | None:
    """Test images found in the corpus fingerprint shipped with the init's weights.

    Returns:
        ``{"corpus", "n_test", "test_ids_in_corpus"}``, or ``None`` when the init ships no
        fingerprint (scratch, ImageNet, weights saved without one).

    Raises:
        ValueError: leaked test images and ``cfg.leakage == "error"`` (``drop`` only warns: the
            test split is never changed to suit an init; ``run_study`` refuses such arms).
    """
    fingerprint = shipped_corpus_fingerprint(cfg.init, target.channels)
    if fingerprint is None:
        return None
    test = np.flatnonzero(splits == "test")
    pairs = check_pretraining_leakage(target.hashes[test], fingerprint, cfg.near_threshold,
                                      test_fine=target.fine_hashes[test])
    ids = sorted({target.ids[test[i]] for i, _, _ in pairs})
    if ids:
        msg = (f"{len(ids)} of {len(test)} test images (e.g. {ids[:3]}) or near-copies are in the pre-training "
               f"corpus of init '{cfg.init}' ({fingerprint.name}): its test score is inflated")
        if cfg.leakage == "error":
            raise ValueError(f"{msg}; evaluate on other test images, or use another init")
        warnings.warn(msg, stacklevel=2)
    return {"corpus": fingerprint.name, "n_test": len(test), "test_ids_in_corpus": ids}


# ------------------------------------------------------------------------------------ model
def build_init(init: str, num_classes: int, data_channels: int, arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a run starts from (see the module docstring for ``init``).

    Returns:
        ``(model, info)`` where ``info`` records ``init``, ``architecture`` and ``pretrained``.

    Raises:
        KeyError: unknown architecture or weight set. FileNotFoundError: missing weights path.
        ValueError: weights that cannot be obtained offline, or a bare file without ``arch``.
    """
    spec = InitSpec.parse(init).resolve(data_channels)
    if spec.kind == "path":
        path = spec.path
        if path.is_dir() or path.suffix == ".json":
            model = load_pretrained(path, num_classes=num_classes)
        elif arch is None:
            raise ValueError(f"init {path} is a bare weights file: also give its architecture (arch='mednet_gray', --arch)")
        else:
            model = create_model(arch, pretrained_file=path, num_classes=num_classes)
        return model, {"init": init, "architecture": model.pretrained_cfg.meta.get("architecture", arch), "pretrained": True}
    name, pretrained = spec.name, spec.pretrained
    scratch_hint = f"to train '{name}' from random weights use init='scratch:{name}'"
    arch_args: dict[str, Any] = {}
    if not pretrained and spec.tag is not None:
        # Random weights shaped like a weight set (its width), not like the architecture's default.
        weights_cfg = get_pretrained_cfg(name)
        arch_args = {k: v for k, v in weights_cfg.meta.get("model_args", {}).items() if k not in ("num_classes", "in_chans")}
        name = spec.arch
    try:
        model = create_model(name, pretrained=pretrained, num_classes=num_classes, **arch_args)
    except WeightsUnavailableError as e:
        raise ValueError(f"{e}; {scratch_hint}") from e
    except KeyError as e:
        if pretrained and "no pretrained weights" in str(e):
            raise KeyError(f"{e.args[0]}; {scratch_hint}") from None
        raise
    return model, {"init": init, "architecture": spec.arch, "pretrained": pretrained}


#: BatchNorm momentum while fine-tuning (PyTorch's default).
FINETUNE_BN_MOMENTUM = 0.1


def prepare_for_transfer(model: nn.Module) -> dict[str, Any]:
    """Make every init start its new task the same way, whatever library built it.

    - The new head's linear layers get PyTorch's default initialisation
      (``nn.Linear.reset_parameters``, uniform in ``+-1/sqrt(fan_in)``). timm's TF-ported models
      (EfficientNet-Lite0) initialise a classifier uniformly in ``+-1/sqrt(num_classes)``, tuned
      for 1000 classes: with 2 classes that is +-0.71 and the first logits reach +-40.
    - BatchNorm momentum is set to ``FINETUNE_BN_MOMENTUM``. The TF ports use 0.01 (TensorFlow's
      0.99 decay, fitted to ~100k ImageNet steps); a fine-tuning run of a few hundred steps would
      then evaluate with running statistics that are still mostly ImageNet's.

    Returns:
        ``{"head_reset": n linear layers, "bn_momentum": value}`` for the run's metrics.
    """
    prefix = head_prefix(model)
    heads = [m for n, m in model.named_modules() if f"{n}.".startswith(prefix) and isinstance(m, nn.Linear)]
    for m in heads:
        m.reset_parameters()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = FINETUNE_BN_MOMENTUM
    return {"head_reset": len(heads), "bn_momentum": FINETUNE_BN_MOMENTUM}


def check_input_contract(model: nn.Module, data_channels: int, image_size: int | None) -> tuple[int, int]:
    """The model's input channels and the run's image size, from the model's ``pretrained_cfg``.

    Gray data for a 3-channel model (the gray plane is repeated) and colour data for a 1-channel
    model (converted to luma) are warned conversions.

    Raises:
        ValueError: ``image_size`` below the model's minimum input size.
    """
    cfg = model.pretrained_cfg
    channels = int(cfg.input_size[0])
    size = int(image_size or cfg.input_size[-1])
    if size < cfg.min_input_size[-1]:
        raise ValueError(f"image_size {size} is below the model's minimum {cfg.min_input_size[-1]}: use a larger image_size")
    if data_channels == 1 and channels == 3:
        warnings.warn("gray data, 3-channel init: the gray plane is repeated to 3 channels", stacklevel=2)
    elif data_channels == 3 and channels == 1:
        warnings.warn(
            "colour data, 1-channel init: images are converted to gray (ITU-R 601 luma) and colour is lost; "
            "use a colour init (mednet_color) to keep it", stacklevel=2,
        )
    return channels, size


# ------------------------------------------------------------------------------------ training
@torch.no_grad()
def predict_proba(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities ``(N, K)`` (float64) and labels ``(N,)`` over ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    probs, ys = [], []
    for x, y in loader:
        logits = model(x.to(device)).float()
        probs.append(torch.softmax(logits.double(), dim=1).cpu())
        ys.append(y)
    model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(ys).numpy()


def _val_score(y: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """``(macro AUROC, cross-entropy)`` on validation; AUROC is NaN when val has one class."""
    auroc = BOOTSTRAP_METRICS["auroc_macro"](y, probs)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))
    return auroc, loss


def _auroc_val_score(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Classification's model-choice score: ``{"val_auroc", "val_loss"}`` (``_val_score``)."""
    probs, y = predict_proba(model, loader, device)
    auroc, loss = _val_score(y, probs)
    return {"val_auroc": auroc, "val_loss": loss}


def _class_weights(y_train: np.ndarray, k: int) -> Tensor:
    from sklearn.utils.class_weight import compute_class_weight

    return torch.as_tensor(compute_class_weight("balanced", classes=np.arange(k), y=y_train), dtype=torch.float32)


def _train(model, loaders, cfg: FinetuneConfig, weights: Tensor | None, dist: DistEnv,
           precision: str, channels_last: bool, loss_fn=None, val_score=None) -> tuple[list[dict], int]:
    """Fine-tune ``model`` on the engine's loop (``engine.loop.fit``) with early stopping; leaves the
    best weights in ``model``. Returns ``(history, best epoch)``, epochs counted from 1.

    ``precision`` and ``channels_last`` are the resolved values (``resolve_precision``); ``loss_fn``
    replaces the cross-entropy ``compute_loss`` (FixMatch, ``openmednet.eval.semi``; segmentation's
    Dice + cross-entropy). ``val_score(model, loader, device)`` returns ``{"val_<score>": higher is
    better, "val_loss": tie-break}`` for the history and the model choice (default: macro AUROC;
    segmentation: foreground Dice, ``openmednet.eval.segmentation``).
    """
    optimizer = build_optimizer(
        model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
        head_prefixes=(head_prefix(model),), head_lr_mult=cfg.head_lr_mult,
    )
    steps = len(loaders["train"])
    scheduler = build_scheduler(optimizer, total_steps=cfg.epochs * steps, warmup_steps=cfg.warmup_epochs * steps)
    weights = None if weights is None else weights.to(dist.device)

    def compute_loss(m: nn.Module, batch: tuple[Tensor, Tensor]) -> LossOutput:
        x, y = batch
        return LossOutput(F.cross_entropy(m(x), y, weight=weights), n=len(y))

    score = val_score or _auroc_val_score
    stopping = EarlyStopping(lambda m: score(m, loaders["val"], dist.device), cfg.patience, min_epochs=cfg.min_epochs)
    records = fit(model, loaders["train"], optimizer, loss_fn or compute_loss, epochs=cfg.epochs, dist=dist,
                  scheduler=scheduler, precision=precision, channels_last=channels_last, convert_model=False,
                  callbacks=[stopping], first_epoch=1)
    history = [{"epoch": r["epoch"], "train_loss": r["train/loss"], **{k: r[k] for k in r if k.startswith("val_")},
                "lr": r["train/lr"]} for r in records]
    return history, stopping.best_epoch


# ------------------------------------------------------------------------------------ outputs
def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _write_splits(out: Path, target: TargetSet, splits: np.ndarray, used: np.ndarray) -> None:
    used_set = set(used.tolist())
    rows = [[target.ids[i], target.labels[i], target.groups[i] or "", splits[i], int(i in used_set),
             f"{int(target.hashes[i]):016x}"] for i in range(len(target))]
    _write_csv(out / "splits.csv", ["id", "label", "group", "split", "used_for_training", "phash"], rows)


def _split_run(cfg: FinetuneConfig, target: Any, out: Path) -> tuple[Any, np.ndarray, dict[str, np.ndarray],
                                                                   dict[str, list[str]], dict[str, Any] | None]:
    """The data half of a run, for classification and segmentation (``eval.segmentation``) alike.

    Splits ``target`` (``prepare_splits``: group-aware, stratified by ``labels``, near copies
    dropped), checks the test split against the init's pre-training corpus, subsamples the
    training part (``label_fraction`` / ``per_class``) and writes ``splits.csv`` to ``out``.

    Returns:
        ``(target, splits, idx, dropped, pretraining)``: the target left after the checks, its
        ``(N,)`` split names, the item indices of each split (``idx["train"]`` the ones trained
        on), the ids dropped per reason, and the leakage report (``None`` without a corpus).
    """
    target, splits, dropped = prepare_splits(target, cfg)
    pretraining = check_init_corpus(cfg, target, splits)
    idx = {name: np.flatnonzero(splits == name) for name in ("train", "val", "test")}
    if cfg.label_fraction is not None or cfg.per_class is not None:
        idx["train"] = subsample_train(target.labels, idx["train"], fraction=cfg.label_fraction,
                                       per_class=cfg.per_class, seed=cfg.seed)
    _write_splits(out, target, splits, idx["train"])
    return target, splits, idx, dropped, pretraining


def _place_model(cfg: FinetuneConfig, model: nn.Module, info: dict[str, Any]) -> tuple[DistEnv, str, bool]:
    """Move ``model`` to the run's device; ``(dist, precision, channels_last)``, recorded in ``info``."""
    dist = DistEnv(device=training_device(cfg))
    precision, channels_last = resolve_precision(cfg.precision, dist.device, cfg.channels_last)
    info.update(precision=precision, channels_last=channels_last)
    model.to(dist.device)
    return dist, precision, channels_last


def _write_predictions(out: Path, ids: list[str], target: TargetSet, y: np.ndarray, probs: np.ndarray) -> None:
    # repr() of a float is its shortest round-trip form: the CSV reproduces the probabilities exactly.
    rows = [[ids[i], target.label_names[y[i]], int(y[i])] + [repr(float(p)) for p in probs[i]] for i in range(len(y))]
    _write_csv(out / "predictions.csv", ["id", "label", "y"] + [f"prob_{n}" for n in target.label_names], rows)


def _plots(out: Path, history: list[dict], best_epoch: int, test: dict, y: np.ndarray, probs: np.ndarray, names) -> None:
    plots = out / "plots"
    report.plot_learning_curves(history, plots / "learning_curves.png", best_epoch)
    report.plot_confusion_matrix(test["confusion_matrix"], names, plots / "confusion_matrix.png")
    report.plot_roc(y, probs, names, plots / "roc.png")
    report.plot_reliability(test["calibration"], plots / "reliability.png", test["ece"])


def _counts(target: TargetSet, splits: np.ndarray, used: np.ndarray) -> dict[str, dict[str, int]]:
    out = {s: dict(Counter(target.labels[splits == s].tolist())) for s in ("train", "val", "test")}
    out["train_used"] = dict(Counter(target.labels[used].tolist()))
    return out


# ------------------------------------------------------------------------------------ run
def training_device(cfg: FinetuneConfig) -> torch.device:
    """Where ``cfg`` trains: ``cfg.device``, else CUDA when available, else the CPU."""
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _build_model(cfg: FinetuneConfig, target: TargetSet) -> tuple[nn.Module, int, int, dict[str, Any]]:
    """Init -> contract check -> common head/BN preparation -> strategy: ``(model, C, size, info)``."""
    torch.manual_seed(cfg.seed)  # the new head's initialisation
    model, info = build_init(cfg.init, len(target.label_names), target.channels, cfg.arch)
    channels, size = check_input_contract(model, target.channels, cfg.image_size)
    info.update(prepare_for_transfer(model))
    info.update(apply_strategy(model, cfg.strategy, k=cfg.freeze_k, seed=cfg.seed))
    info.update(input_size=[channels, size, size], mean=list(model.pretrained_cfg.mean), std=list(model.pretrained_cfg.std))
    return model, channels, size, info


def run_contract(model: nn.Module, channels: int, size: int) -> Any:
    """The input contract of a run: the init's ``pretrained_cfg`` at the run's channels and size.

    It is what the fine-tuned model's card records (``save_pretrained(input_size=...)``), so
    ``EvalInputs(run_contract(...))`` here and ``EvalInputs(card)`` in ``openmednet predict`` are
    the same pipeline.
    """
    return model.pretrained_cfg.replace(input_size=(channels, size, size))


def _make_loaders(cfg: FinetuneConfig, target: TargetSet, idx: dict[str, np.ndarray], model: nn.Module,
                  channels: int, size: int) -> dict[str, DataLoader]:
    """Train (augmented, shuffled with the run seed), val and test loaders over the decoded images.

    Every image is prepared once by ``EvalInputs.prepare`` (channels, shorter side to the model's
    size, centre square), as ``openmednet predict`` prepares a file; validation and test then get
    ``EvalInputs.normalize``, training the augmentation. Channel conversions were warned once by
    ``check_input_contract``.
    """
    contract = run_contract(model, channels, size)
    inputs = EvalInputs(contract)
    augment = "gray" if target.channels == 1 else "auto"  # no colour jitter for gray content
    transforms = {True: build_transform(contract, train=True, augment=augment, hflip=cfg.hflip),
                  False: inputs.normalize}
    loaders = {}
    for name, train in (("train", True), ("val", False), ("test", False)):
        # Already prepared: the dataset's own channel conversion and resize are identities here,
        # it only caches the (C, S, S) uint8 arrays.
        ds = LabelledDataset(
            [(inputs.prepare(target.images[i])[0], target.labels[i]) for i in idx[name]], channels=channels,
            image_size=size, transform=transforms[train], class_names=list(target.label_names), resize_mode="crop",
        )
        loaders[name] = split_loader(ds, cfg, train)
    return loaders


def split_loader(ds: Any, cfg: Any, train: bool, **kwargs: Any) -> Any:
    """The loader of one split, for classification and segmentation alike.

    ``build_loader`` draws the epoch order and every image's augmentation from (run seed, epoch,
    position), so a run is reproducible whatever ``num_workers`` is. Training drops a last batch
    of one image, which breaks BatchNorm in train mode. ``kwargs`` go to ``build_loader``.
    """
    return build_loader(
        ds, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=train, num_workers=cfg.num_workers,
        drop_last=train and len(ds) % cfg.batch_size == 1 and len(ds) > 1, **kwargs,
    )


def run_finetune(cfg: FinetuneConfig, target: TargetSet | None = None) -> FinetuneResult:
    """Fine-tune and evaluate (see the module docstring); returns the run's metrics.

    Args:
        cfg: the run's configuration.
        target: the already decoded ``cfg.data`` (a study decodes each target once for all its
            arms); ``None`` loads it with ``cfg``'s reading options.

    Raises:
        FileNotFoundError, KeyError, ValueError: bad data, init, or configuration (clear messages).
    """
    if cfg.task == "segmentation":  # the same splits, leakage checks and _train; a U-Net and Dice
        from openmednet.eval.segmentation import run_segmentation

        return run_segmentation(cfg, target)
    seed_everything(cfg.seed)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if target is None:
        target = load_target(cfg.data, format=cfg.format, csv_file=cfg.csv_file, columns=cfg.columns,
                             label_map=cfg.label_map, classes=cfg.classes, max_side=cfg.max_side)
    target, splits, idx, dropped, pretraining = _split_run(cfg, target, out)

    model, channels, size, model_info = _build_model(cfg, target)
    if cfg.max_side is not None and size > cfg.max_side:
        warnings.warn(f"input size {size} exceeds max_side={cfg.max_side}: images are upsampled; raise max_side", stacklevel=2)
    dist, precision, channels_last = _place_model(cfg, model, model_info)
    loaders = _make_loaders(cfg, target, idx, model, channels, size)
    weights = _class_weights(target.y[idx["train"]], len(target.label_names)) if cfg.class_weighted else None
    if cfg.semi == "none":
        history, best_epoch = _train(model, loaders, cfg, weights, dist, precision, channels_last)
    else:  # pseudo-labelling rounds or FixMatch on this loop; model choice on validation as above
        from openmednet.eval.semi import run_semi

        history, best_epoch, semi_info = run_semi(
            cfg, target, splits, idx, model, loaders, weights, device=dist.device,
            train=lambda m, ls, w, loss_fn=None: _train(m, ls, cfg, w, dist, precision, channels_last, loss_fn))
    atomic_write_text(out / "history.json", json.dumps(history, indent=1) + "\n")

    # The only time the test split is looked at.
    probs, y_test = predict_proba(model, loaders["test"], dist.device)
    _write_predictions(out, [target.ids[i] for i in idx["test"]], target, y_test, probs)
    test = evaluate_predictions(y_test, probs, target.label_names, n_boot=cfg.n_boot, seed=cfg.seed,
                                groups=[target.groups[i] for i in idx["test"]])
    _plots(out, history, best_epoch, test, y_test, probs, target.label_names)

    best = next(h for h in history if h["epoch"] == best_epoch)
    metrics = {
        "test": test,
        "val": {"auroc_macro": best["val_auroc"], "loss": best["val_loss"]},
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "test_leaked_in_pretraining": bool(pretraining and pretraining["test_ids_in_corpus"]),
        "data": {
            "root": str(cfg.data), "n_images": len(target), "channels": target.channels,
            "label_names": list(target.label_names), "counts": _counts(target, splits, idx["train"]),
            "dropped": dropped, "skipped": target.skipped, "pretraining_leakage": pretraining,
        },
        "model": model_info,
        "config": to_dict(cfg),
        **({"semi": semi_info} if cfg.semi != "none" else {}),
    }
    save_pretrained(
        model.cpu(), out / "model", data=(str(cfg.data),), objective=f"finetune:{cfg.strategy}",
        epochs=best_epoch, metrics={m: test[m] for m in ("auroc_macro", "balanced_accuracy", "accuracy", "f1_macro")},
        input_size=(channels, size, size), label_names=target.label_names,
    )
    # metrics.json is the completion marker a study resumes by: written last, after the model.
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, allow_nan=True) + "\n")
    logger.info("test macro AUROC %.4f (best epoch %d); outputs in %s", test["auroc_macro"], best_epoch, out)
    return FinetuneResult(out=out, metrics=metrics)

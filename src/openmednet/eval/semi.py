"""Semi-supervised fine-tuning: few labels, many unlabelled images.

``run_finetune`` hands its run here when ``FinetuneConfig.semi`` is not ``"none"``; splits, leakage
checks on the labelled data, the label budget, the test evaluation and every output stay
``run_finetune``'s. Unlabelled images come from ``FinetuneConfig.unlabelled`` (folders, or
``rest_of_train``; ``openmednet.eval.unlabelled``), without near-copies of test images.

Methods:

- ``pseudo_label``: teacher-student self-training (Noisy Student, Xie et al. 2020, CVPR).
  Round 0: the teacher is the supervised fine-tuned model (exactly what ``semi: none`` trains).
  Round k: the teacher predicts the unlabelled images without noise (eval mode, evaluation
  transform); confident predictions are kept by ``select_pseudo_labels`` so that a majority class
  cannot swallow the rest; a student is built from the same init and trained, with noise
  (RandAugment on every image, dropout at least ``student_dropout``), on the labels plus the pseudo
  labels; it becomes the next teacher. ``rounds`` rounds in all.
  Model choice: the round whose model has the best labelled-validation score (macro AUROC, ties to
  the lower loss, then to the earlier round), so a round that hurts is not kept; every round's
  teacher, pseudo-label counts per class and validation AUROC are in ``metrics.json``
  (``semi.rounds``).
- ``fixmatch`` (Sohn et al. 2020, NeurIPS): one run from the init; each step a labelled batch of
  ``batch_size`` and an unlabelled batch of ``mu * batch_size``, each unlabelled image seen as a
  weak view (the run's usual augmentation) and a strong one (``StrongAugment``: RandAugment + the
  usual augmentation + Cutout). Loss = cross-entropy on the labels + ``lambda_u`` x cross-entropy of
  the strong view against the weak view's argmax, for images whose weak confidence is at least
  ``semi_threshold`` (0.95 in the paper). An epoch is one pass over the larger of the two sets (the
  other is cycled). Deviations from the paper, for CPU-sized targets: ``mu`` 2 (paper 7: with a few
  hundred unlabelled images that would leave 1-2 steps per epoch), the run's optimizer and
  schedule (AdamW, warm-up + cosine over the epochs) instead of SGD with Nesterov momentum, and
  early stopping / model choice on the labelled validation split, like every fine-tuning run.
- ``freematch`` (Wang et al. 2023, ICLR): FixMatch with a self-adaptive per-class threshold instead
  of the fixed 0.95, plus a fairness term (``openmednet.eval.freematch``): few-label fine-tuning
  rarely reaches 0.95 confidence, so FixMatch's unlabelled term barely trains (its ``mask_rate``
  in ``metrics.json``). ``sat_momentum`` (0.9, see that module for why not the paper's 0.999)
  and ``lambda_f`` (0.01) are its settings; everything else is FixMatch's.

The test split is scored once, by ``run_finetune``, after the choice.

Resume (``pseudo_label``): each finished round is kept in ``out/semi/round<k>/`` (``model.safetensors``,
``pseudo_labels.csv``, then ``round.json`` as the completion marker). Re-running the same
configuration reuses the finished rounds (a killed run continues where it stopped; a larger
``rounds`` extends a run) and gives the same result as an uninterrupted run: each round re-seeds
from ``(seed, round)``. A different configuration in that folder is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn
from torch.nn import functional as F

from openmednet._errors import look_up_option
from openmednet.config import to_dict
from openmednet.data.datasets import LabelledDataset
from openmednet.data.loader import build_loader
from openmednet.data.semi import StrongAugment, UnlabelledDataset
from openmednet.data.transforms import MultiViewTransform
from openmednet.engine.callbacks import better_score
from openmednet.engine.trainer import LossOutput, set_loader_epoch
from openmednet.eval.freematch import SelfAdaptiveThreshold, fairness_loss
from openmednet.eval.unlabelled import REST_OF_TRAIN, UnlabelledSet, drop_held_out_near_copies, load_unlabelled, rest_of_train
from openmednet.utils import atomic_write, atomic_write_text, csv_text, seed_everything

__all__ = ["FREEMATCH_FIELDS", "METHOD_FIELDS", "PSEUDO_SELECTIONS", "SEMI_FIELDS", "SEMI_METHODS", "FixMatchLoss",
           "PairedLoader", "check_semi_config", "gather_unlabelled", "has_unlabelled", "run_semi", "select_pseudo_labels",
           "semi_neutral", "split_study_strategy", "study_strategies", "unread_semi_message", "unread_semi_settings"]

logger = logging.getLogger(__name__)

SEMI_METHODS = ("none", "pseudo_label", "fixmatch", "freematch")
#: How confident teacher predictions become pseudo labels (``select_pseudo_labels``).
PSEUDO_SELECTIONS = ("class_balanced", "per_class_threshold", "threshold")
#: FinetuneConfig fields that only matter when ``semi`` is not ``"none"``.
SEMI_FIELDS = ("unlabelled", "rounds", "semi_threshold", "pseudo_selection", "pseudo_fraction", "student_dropout",
               "mu", "lambda_u", "strong_magnitude", "max_unlabelled", "sat_momentum", "lambda_f")
#: Fields only ``freematch`` reads: left out of other runs' comparisons, so runs made before they existed stay valid.
FREEMATCH_FIELDS = ("sat_momentum", "lambda_f")
#: The semi-supervised settings each method reads (``run_semi``); the rest of SEMI_FIELDS it ignores.
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "pseudo_label": ("unlabelled", "max_unlabelled", "rounds", "semi_threshold", "pseudo_selection", "pseudo_fraction",
                     "student_dropout", "strong_magnitude"),
    "fixmatch": ("unlabelled", "max_unlabelled", "semi_threshold", "mu", "lambda_u", "strong_magnitude"),
    "freematch": ("unlabelled", "max_unlabelled", "mu", "lambda_u", "strong_magnitude", "sat_momentum", "lambda_f"),
}
#: Fields a finished round does not depend on (``rounds``: a longer run reuses the earlier rounds).
_ROUND_NEUTRAL = ("out", "device", "num_workers", "rounds", "n_boot")


# ------------------------------------------------------------------------------------ config
def check_semi_config(cfg: Any) -> None:
    """Validate the semi-supervised fields of a ``FinetuneConfig`` (called by its ``__post_init__``).

    Raises:
        KeyError: unknown method or selection (with a suggestion).
        ValueError: out-of-range values, or ``unlabelled`` without ``semi`` (or the reverse).
    """
    look_up_option(cfg.semi, SEMI_METHODS, "semi method")
    look_up_option(cfg.pseudo_selection, PSEUDO_SELECTIONS, "pseudo_selection")
    if isinstance(cfg.unlabelled, (str, Path)):  # iterated, "DIR" would be the folders D, I, R
        raise ValueError(f"unlabelled must be a sequence of sources, got {str(cfg.unlabelled)!r}: write "  # noqa: TRY004
                         f"unlabelled=({str(cfg.unlabelled)!r},)")
    if cfg.semi != "none" and not cfg.unlabelled:
        raise ValueError(f"semi={cfg.semi!r} needs unlabelled images: give --unlabelled DIR (several allowed) or "
                         f"--unlabelled {REST_OF_TRAIN}")
    if cfg.semi == "none" and cfg.unlabelled:
        raise ValueError("unlabelled images were given but semi='none' would ignore them: choose --semi "
                         "pseudo_label, fixmatch or freematch")
    if REST_OF_TRAIN in cfg.unlabelled and len(cfg.unlabelled) > 1:
        raise ValueError(f"'{REST_OF_TRAIN}' cannot be combined with folders: give one or the other")
    if cfg.rounds < 1 or cfg.mu < 1:
        raise ValueError(f"rounds and mu must be >= 1, got {cfg.rounds}, {cfg.mu}")
    if not 0 <= cfg.semi_threshold < 1 or not 0 < cfg.pseudo_fraction <= 1 or not 0 <= cfg.student_dropout < 1:
        raise ValueError(f"need 0 <= semi_threshold < 1, 0 < pseudo_fraction <= 1 and 0 <= student_dropout < 1, got "
                         f"{cfg.semi_threshold}, {cfg.pseudo_fraction}, {cfg.student_dropout}")
    if cfg.max_unlabelled is not None and cfg.max_unlabelled < 1:
        raise ValueError(f"max_unlabelled must be >= 1 (or None for all), got {cfg.max_unlabelled}")
    # Chained comparisons reject NaN and infinity too: a loss weight of nan or inf passed "< 0" and
    # stopped the run at its first step with a NonFiniteLossError traceback.
    if not 0 <= cfg.sat_momentum < 1 or not 0 <= cfg.lambda_f < math.inf:
        raise ValueError(f"need 0 <= sat_momentum < 1 and a finite lambda_f >= 0, got {cfg.sat_momentum}, {cfg.lambda_f}")
    if not 0 <= cfg.lambda_u < math.inf or not 0 <= cfg.strong_magnitude <= 30:
        raise ValueError(f"need a finite lambda_u >= 0 and 0 <= strong_magnitude <= 30, got {cfg.lambda_u}, "
                         f"{cfg.strong_magnitude}")


def unread_semi_settings(settings: Any, methods: Sequence[str]) -> list[str]:
    """The semi-supervised settings of ``settings`` (a ``FinetuneConfig``, or a study's shared
    ``finetune`` section) changed from their defaults that none of ``methods`` reads.

    E.g. ``sat_momentum`` with ``--semi fixmatch``, or ``rounds`` in a study whose grid has no
    ``pseudo_label`` arm: accepted silently, such a setting looks applied and is not.
    """
    read = {f for method in methods for f in METHOD_FIELDS.get(method, ())}
    defaults = {f.name: f.default for f in dataclasses.fields(settings)}
    return [f for f in SEMI_FIELDS if f in defaults and f not in read and f != "unlabelled"
            and getattr(settings, f) != defaults[f]]


def unread_semi_message(fields: Sequence[str], methods: Sequence[str]) -> str:
    """What to tell the user about ``unread_semi_settings``' answer (which method reads each)."""
    readers = {f: [m for m, read in METHOD_FIELDS.items() if f in read] for f in fields}
    named = "; ".join(f"{f} ({', '.join(readers[f])})" for f in fields)
    return (f"ignored settings: semi={'/'.join(methods)} does not read {named}; remove them or choose the method "
            f"in brackets")


def semi_neutral(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the fields its method does not read: the semi-supervised ones when
    ``semi`` is ``"none"`` (or absent), FreeMatch's unless it is ``"freematch"``; so runs made before
    these fields existed compare equal to today's runs of the same method."""
    method = config.get("semi", "none")
    unread = ("semi", *SEMI_FIELDS) if method == "none" else () if method == "freematch" else FREEMATCH_FIELDS
    return {k: v for k, v in config.items() if k not in unread}


# ------------------------------------------------------------------------------------ studies
def study_strategies(strategies: tuple[str, ...], semi: tuple[str, ...]) -> list[str]:
    """A study's strategy x semi axis as arm labels: ``full`` (``semi: none``, the directory studies
    used before), ``full+fixmatch``, ``full+pseudo_label``; reports group and plot by this label."""
    for method in semi:
        look_up_option(method, SEMI_METHODS, "semi method")
    return [s if m == "none" else f"{s}+{m}" for s in strategies for m in semi]


def split_study_strategy(label: str, unlabelled: tuple[str, ...]) -> dict[str, Any]:
    """``FinetuneConfig`` fields of an arm label from :func:`study_strategies`."""
    strategy, _, method = label.partition("+")
    return {"strategy": strategy, "semi": method or "none", "unlabelled": tuple(unlabelled) if method else ()}


def has_unlabelled(label: str, unlabelled: tuple[str, ...], budget: Mapping[str, Any]) -> bool:
    """Whether a semi arm has unlabelled images: ``rest_of_train`` is empty when every label is used
    (budget ``frac1``), so such arms are skipped instead of failing."""
    return "+" not in label or tuple(unlabelled) != (REST_OF_TRAIN,) or bool(budget.get("per_class") or budget.get("label_fraction"))


# ------------------------------------------------------------------------------------ selection
def select_pseudo_labels(probs: np.ndarray, *, threshold: float, selection: str = "class_balanced",
                         fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Which teacher predictions become pseudo labels.

    Args:
        probs: ``(N, K)`` teacher probabilities of the unlabelled images.
        threshold: confidence (max probability) a prediction needs (``class_balanced``, ``threshold``).
        selection:
            - ``"class_balanced"`` (default; Noisy Student's balancing, sec. 3): the same number of
              images per class, the most confident ones above ``threshold``; that number is the
              smallest class's count of confident predictions. A teacher that calls nearly
              everything the majority class therefore adds no more majority than minority images.
            - ``"per_class_threshold"`` (class-balanced self-training, Zou et al. 2018, ECCV): each
              class ``c`` gets its own threshold, the confidence of its ``fraction`` most
              confident predictions, so classes the teacher is less sure of still contribute;
              shares follow the teacher's predicted class shares.
            - ``"threshold"``: every prediction above ``threshold`` (Lee 2013); the majority class
              usually dominates. For comparison.
        fraction: share of each class's predictions kept by ``per_class_threshold``.

    Returns:
        ``(indices, labels, info)``: sorted indices into ``probs``, their ``(M,)`` class indices,
        and ``{"threshold_per_class", "confident_per_class", "kept_per_class"}`` (lists over classes;
        a threshold is ``None`` for a class no image is predicted as).
    """
    look_up_option(selection, PSEUDO_SELECTIONS, "pseudo_selection")
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must be (N, K) with K >= 2 classes, got shape {probs.shape}")
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    k = probs.shape[1]
    members = [np.flatnonzero(pred == c) for c in range(k)]
    confident = [m[conf[m] >= threshold] for m in members]
    thresholds = [float(threshold)] * k
    if selection == "threshold":
        kept = confident
    elif selection == "class_balanced":
        per_class = min(len(c) for c in confident)
        kept = [c[np.argsort(-conf[c], kind="stable")[:per_class]] for c in confident]
    else:
        kept, thresholds = [], []
        for m in members:
            if not len(m):
                kept.append(m)
                thresholds.append(None)  # the teacher predicts this class for no image
                continue
            n = max(1, int(round(fraction * len(m))))
            order = m[np.argsort(-conf[m], kind="stable")]
            kept.append(order[:n])
            thresholds.append(float(conf[order[n - 1]]))
    idx = np.sort(np.concatenate(kept)).astype(np.int64)
    info = {"threshold_per_class": thresholds, "confident_per_class": [int(len(c)) for c in confident],
            "kept_per_class": [int(len(c)) for c in kept]}
    return idx, pred[idx], info


# ------------------------------------------------------------------------------------ data
def gather_unlabelled(cfg: Any, target: Any, splits: np.ndarray, used: np.ndarray) -> tuple[UnlabelledSet, dict[str, Any]]:
    """The run's unlabelled images (``rest_of_train`` or folders) without near-copies of held-out images.

    ``rest_of_train`` images are checked against the test split (they are training images, held
    to the training images' rule); images from folders against the validation and test splits,
    since a folder may hold the target's own validation images (``drop_held_out_near_copies``).

    With ``cfg.max_unlabelled``, at most that many of the remaining images, drawn uniformly with
    ``cfg.seed`` (the size of the unlabelled pool is a standard axis of semi-supervised benchmarks;
    on a CPU it bounds the cost of a FixMatch epoch, which is a pass over the unlabelled pool).

    Returns:
        The images, and what ``metrics.json`` records about them (sources, counts, dropped ids).
    """
    from_train = tuple(cfg.unlabelled) == (REST_OF_TRAIN,)
    if from_train:
        unl = rest_of_train(target, splits, used)
    else:
        unl = load_unlabelled(cfg.unlabelled, channels=target.channels, max_side=cfg.max_side)
    found = len(unl)
    unl, dropped = drop_held_out_near_copies(unl, target, splits, near_threshold=cfg.near_threshold, leakage=cfg.leakage,
                                             held_out=("test",) if from_train else ("val", "test"))
    n_clean = len(unl)
    if cfg.max_unlabelled is not None and n_clean > cfg.max_unlabelled:
        keep = np.random.default_rng([cfg.seed, 7919]).choice(n_clean, size=cfg.max_unlabelled, replace=False)
        unl = unl.subset(np.sort(keep))
    info = {"sources": list(unl.sources), "n_found": found, "n_clean": n_clean, "n_used": len(unl),
            "labels_hidden": unl.labels_hidden,
            "skipped": unl.skipped, "dropped": dropped}
    logger.info("unlabelled images: %d used of %d found (%s dropped)", len(unl), found,
                ", ".join(f"{len(ids)} {key.replace('_', ' ')} images" for key, ids in dropped.items()))
    return unl, info


class PairedLoader:
    """Zips a labelled and an unlabelled loader for FixMatch: one epoch is a pass over the longer one,
    the shorter restarts (with a new epoch seed) when it runs out.

    Yields ``((x, y), (views, -1))`` batches; ``len`` is the longer loader's length. ``set_epoch``
    (called by ``train_one_epoch`` through ``.sampler``) seeds both loaders' orders.
    """

    def __init__(self, labelled: Any, unlabelled: Any):
        self.labelled, self.unlabelled = labelled, unlabelled
        self.sampler = self  # engine.trainer.set_loader_epoch looks for loader.sampler.set_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` of both loaders."""
        self.epoch = epoch
        set_loader_epoch(self.labelled, epoch)
        set_loader_epoch(self.unlabelled, epoch)

    def __len__(self) -> int:
        return max(len(self.labelled), len(self.unlabelled))

    def _cycle(self, loader: Any) -> Iterator[Any]:
        restart = 0
        while True:
            yield from loader
            restart += 1  # a distinct order for every restart within the epoch
            set_loader_epoch(loader, self.epoch * 1000 + restart)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        labelled, unlabelled = self._cycle(self.labelled), self._cycle(self.unlabelled)
        for _ in range(len(self)):
            yield next(labelled), next(unlabelled)


class FixMatchLoss:
    """``compute_loss`` of a FixMatch step (Sohn et al. 2020, eq. 2-4), for ``train_one_epoch``; with a
    :class:`~openmednet.eval.freematch.SelfAdaptiveThreshold`, a FreeMatch step (Wang et al. 2023).

    Labelled images and both unlabelled views go through the model in one forward pass (so
    BatchNorm sees them together, as in the reference implementation).

    Args:
        weights: ``(K,)`` class weights of the supervised term, or ``None``.
        threshold: weak-view confidence needed for an unlabelled image to count (tau, FixMatch), or
            FreeMatch's self-adaptive per-class threshold.
        lambda_u: weight of the unlabelled term.
        num_classes: K, for the per-class counts of accepted pseudo labels.
        lambda_f: weight of FreeMatch's fairness term (``freematch.fairness_loss``; needs a
            self-adaptive threshold).

    Attributes:
        accepted: ``(K,)`` counts of accepted pseudo labels per class over the run; ``seen``:
            unlabelled images seen.
    """

    def __init__(self, weights: Tensor | None, threshold: float | SelfAdaptiveThreshold, lambda_u: float,
                 num_classes: int, lambda_f: float = 0.0):
        if lambda_f and not isinstance(threshold, SelfAdaptiveThreshold):
            raise ValueError("the fairness term (lambda_f) needs FreeMatch's self-adaptive threshold")
        self.weights, self.threshold, self.lambda_u, self.lambda_f = weights, threshold, lambda_u, lambda_f
        self.accepted = np.zeros(num_classes, dtype=np.int64)
        self.seen = 0

    def _mask(self, probs: Tensor, conf: Tensor) -> Tensor:
        if isinstance(self.threshold, SelfAdaptiveThreshold):
            return self.threshold(probs).to(probs.device)
        return (conf >= self.threshold).float()

    def __call__(self, model: nn.Module, batch: Any) -> LossOutput:
        (x, y), (views, _) = batch
        weak, strong = views
        logits = model(torch.cat([x, weak, strong]))
        logits_x, logits_w, logits_s = logits.split([len(x), len(weak), len(strong)])
        loss_x = F.cross_entropy(logits_x, y, weight=None if self.weights is None else self.weights.to(logits.device))
        with torch.no_grad():
            probs_w = torch.softmax(logits_w.detach().float(), dim=1)
            conf, pseudo = probs_w.max(dim=1)
            mask = self._mask(probs_w, conf)
        loss_u = (F.cross_entropy(logits_s, pseudo, reduction="none") * mask).mean()
        loss = loss_x + self.lambda_u * loss_u
        metrics = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "mask_rate": mask.mean()}
        if self.lambda_f and mask.any():
            accepted = torch.softmax(logits_s[mask.bool()].float(), dim=1)
            loss_f = fairness_loss(accepted, self.threshold.p_model, self.threshold.label_hist)
            loss = loss + self.lambda_f * loss_f
            metrics["loss_f"] = loss_f.detach()
        self.accepted += np.bincount(pseudo[mask.bool()].cpu().numpy(), minlength=len(self.accepted))
        self.seen += len(weak)
        return LossOutput(loss, n=len(y), metrics=metrics)


# ------------------------------------------------------------------------------------ helpers
def _transforms(loaders: Mapping[str, Any]) -> tuple[Any, Any, int, int]:
    """The run's training and evaluation transforms and its cached channels and size."""
    val = loaders["val"].dataset
    channels, size = int(val.images.shape[1]), int(val.images.shape[-1])
    return loaders["train"].dataset.transform, val.transform, channels, size


def _add_noise(model: nn.Module, p: float) -> float:
    """Student noise: every dropout at least ``p`` (MedNet's head dropout; timm's ``drop_rate``)."""
    highest = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = max(m.p, p)
            highest = max(highest, m.p)
        if hasattr(m, "drop_rate") and isinstance(m.drop_rate, float):
            m.drop_rate = max(m.drop_rate, p)
            highest = max(highest, m.drop_rate)
    if highest == 0.0:
        warnings.warn(f"the student has no dropout layer: student_dropout={p} is not applied", stacklevel=3)
    return highest


def _round_key(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in semi_neutral(to_dict(cfg)).items() if k not in _ROUND_NEUTRAL}


def _load_round(folder: Path, key: dict[str, Any], model: nn.Module) -> dict[str, Any] | None:
    """A finished round's record, its weights loaded into ``model``; ``None`` if not finished."""
    marker = folder / "round.json"
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    if record.get("config") != key:
        raise ValueError(f"{folder} holds a round of a run with a different configuration: use a new --out "
                         f"directory, or delete {folder.parent} to redo the rounds")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    logger.info("round %d: done before, reusing it (%s)", record["round"], folder)
    return record


def _save_round(folder: Path, model: nn.Module, record: dict[str, Any], pseudo_rows: list[list[Any]]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda f: f.write(save(state)))
    atomic_write_text(folder / "pseudo_labels.csv", csv_text(["id", "pseudo_label", "confidence"], pseudo_rows)[0])
    atomic_write_text(folder / "round.json", json.dumps(record, indent=1, allow_nan=True) + "\n")  # marker, last
    return record


def _best_round(records: list[dict[str, Any]]) -> dict[str, Any]:
    best, chosen = None, records[0]
    for r in records:
        if better_score((r["val_auroc"], r["val_loss"]), best):
            best, chosen = (r["val_auroc"], r["val_loss"]), r
    return chosen


# ------------------------------------------------------------------------------------ methods
def _pseudo_label(cfg, target, idx, model, loaders, weights, train, unl: UnlabelledSet, device) -> tuple[list, int, dict]:
    """Teacher-student rounds (module docstring); leaves the chosen round's weights in ``model``."""
    from openmednet.eval.finetune import _build_model, _class_weights, predict_proba

    train_tf, eval_tf, channels, size = _transforms(loaders)
    unl_loader = build_loader(UnlabelledDataset(unl.images, channels=channels, image_size=size, transform=eval_tf),
                              batch_size=cfg.batch_size, shuffle=False, seed=cfg.seed)
    root, key, records = cfg.out / "semi", _round_key(cfg), []
    names = list(target.label_names)
    teacher = model
    for k in range(cfg.rounds + 1):
        folder = root / f"round{k}"
        student = model if k == 0 else _build_model(cfg, target)[0].to(device)
        record = _load_round(folder, key, student)
        if record is None:
            if k > 0:  # each student from its own seed, so a resumed run replays it (round 0 is `semi: none`'s run)
                seed_everything(cfg.seed + 1009 * k)
            if k == 0:
                history, best_epoch = train(model, loaders, weights)
                counts, rows = {}, []
                noise = None
            else:
                probs, _ = predict_proba(teacher, unl_loader, device)
                chosen, labels, counts = select_pseudo_labels(probs, threshold=cfg.semi_threshold,
                                                              selection=cfg.pseudo_selection, fraction=cfg.pseudo_fraction)
                if not len(chosen):
                    warnings.warn(f"round {k}: no pseudo label kept ({counts['confident_per_class']} confident per class "
                                  f"{names}); the student learns from the labels alone. Lower semi_threshold or use "
                                  f"pseudo_selection=per_class_threshold", stacklevel=2)
                rows = [[unl.ids[i], names[c], repr(float(probs[i].max()))] for i, c in zip(chosen, labels)]
                noise = _add_noise(student, cfg.student_dropout)
                student_loaders = {**loaders, "train": _student_loader(cfg, target, idx, unl, chosen, labels, train_tf, channels, size)}
                y = np.concatenate([target.y[idx["train"]], labels])
                history, best_epoch = train(student, student_loaders, _class_weights(y, len(names)) if weights is not None else None)
            best = next(h for h in history if h["epoch"] == best_epoch)
            record = _save_round(folder, student, {
                "round": k, "teacher": None if k == 0 else f"round{k - 1}", "best_epoch": best_epoch,
                "val_auroc": best["val_auroc"], "val_loss": best["val_loss"], "student_dropout": noise,
                "pseudo": {**{n: dict(zip(names, v)) for n, v in counts.items()}, "n_kept": len(rows)} if k else None,
                "history": history, "config": key,
            }, rows)
            logger.info("round %d: validation AUROC %.4f, pseudo labels kept per class %s", k, record["val_auroc"],
                        (record["pseudo"] or {}).get("kept_per_class"))
        records.append(record)
        teacher = student
    chosen = _best_round(records)
    model.load_state_dict(load_file(str(root / f"round{chosen['round']}" / "model.safetensors")))
    info = {"chosen_round": chosen["round"],
            "rounds": [{k: v for k, v in r.items() if k not in ("history", "config")} for r in records]}
    return chosen["history"], chosen["best_epoch"], info


def _student_loader(cfg, target, idx, unl, chosen, labels, train_tf, channels, size):
    """Labels + pseudo labels, with Noisy Student's input noise (RandAugment before the usual augmentation)."""
    names = list(target.label_names)
    pairs = [(target.images[i], target.labels[i]) for i in idx["train"]]
    pairs += [(unl.images[i], names[c]) for i, c in zip(chosen, labels)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"converted \d+ of \d+ images to", category=UserWarning)
        ds = LabelledDataset(pairs, channels=channels, image_size=size, class_names=names, resize_mode="crop",
                             transform=StrongAugment(train_tf, magnitude=cfg.strong_magnitude, cutout=False))
    return build_loader(ds, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=True,
                        drop_last=len(ds) % cfg.batch_size == 1 and len(ds) > 1)


def _fixmatch(cfg, target, model, loaders, weights, train, unl: UnlabelledSet) -> tuple[list, int, dict]:
    """One FixMatch or FreeMatch run from the init (module docstring); leaves the best epoch's weights in ``model``."""
    train_tf, _, channels, size = _transforms(loaders)
    views = MultiViewTransform([train_tf, StrongAugment(train_tf, magnitude=cfg.strong_magnitude)])
    ds = UnlabelledDataset(unl.images, channels=channels, image_size=size, transform=views)
    batch = cfg.mu * cfg.batch_size
    unl_loader = build_loader(ds, batch_size=batch, seed=cfg.seed + 1, shuffle=True,
                              drop_last=len(ds) % batch == 1 and len(ds) > 1)
    names = list(target.label_names)
    if cfg.semi == "freematch":
        threshold = SelfAdaptiveThreshold(len(names), cfg.sat_momentum)
        loss = FixMatchLoss(weights, threshold, cfg.lambda_u, len(names), lambda_f=cfg.lambda_f)
    else:
        loss = FixMatchLoss(weights, cfg.semi_threshold, cfg.lambda_u, len(names))
    history, best_epoch = train(model, {**loaders, "train": PairedLoader(loaders["train"], unl_loader)}, weights, loss)
    info = {"mu": cfg.mu, "threshold": cfg.semi_threshold, "lambda_u": cfg.lambda_u, "unlabelled_seen": loss.seen,
            "accepted_per_class": dict(zip(names, loss.accepted.tolist())),
            "mask_rate": float(loss.accepted.sum() / max(loss.seen, 1))}
    if cfg.semi == "freematch":  # where the thresholds ended (the last epoch's, not the chosen one's)
        info.update(threshold="self_adaptive", sat_momentum=cfg.sat_momentum, lambda_f=cfg.lambda_f,
                    final_threshold_per_class=dict(zip(names, threshold.class_thresholds.tolist())))
    return history, best_epoch, info


def run_semi(cfg: Any, target: Any, splits: np.ndarray, idx: Mapping[str, np.ndarray], model: nn.Module,
             loaders: Mapping[str, Any], weights: Tensor | None, train: Any, device: torch.device) -> tuple[list, int, dict]:
    """Semi-supervised training of ``model`` (the module docstring), called by ``run_finetune``.

    Args:
        cfg: the run's ``FinetuneConfig`` (``semi`` is ``pseudo_label``, ``fixmatch`` or ``freematch``).
        target, splits, idx: the cleaned target, its split names and the index arrays
            (``idx["train"]`` is the label budget).
        model: the initialised model on ``device``; left holding the chosen weights.
        loaders: the run's ``train``/``val``/``test`` loaders (their transforms are reused).
        weights: class weights of the supervised loss, or ``None``.
        train: ``(model, loaders, weights, loss_fn=None) -> (history, best_epoch)``, the run's epoch
            loop with early stopping and model choice on validation (``run_finetune``'s).
        device: the training device.

    Returns:
        ``(history, best epoch, info)``: the chosen model's epoch history, and ``metrics.json``'s
        ``semi`` entry (method, unlabelled images and their leakage counts, rounds or FixMatch
        counts).
    """
    unl, unl_info = gather_unlabelled(cfg, target, splits, idx["train"])
    if cfg.semi == "pseudo_label":
        history, best_epoch, info = _pseudo_label(cfg, target, idx, model, loaders, weights, train, unl, device)
    else:
        history, best_epoch, info = _fixmatch(cfg, target, model, loaders, weights, train, unl)
    return history, best_epoch, {"method": cfg.semi, "unlabelled": unl_info, **info}

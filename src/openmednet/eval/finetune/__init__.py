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

Modules, one concern each (as ``openmednet.models`` is split): ``_config`` (``FinetuneConfig``,
``FinetuneResult``), ``_data`` (splits, leakage checks, few-shot subset, loaders), ``_model`` (init,
input contract, transfer preparation, device), ``_fit`` (training with model choice, probabilities),
``_outputs`` (the run directory's files) and ``_resume`` (is a finished run in the folder this run?
shared with studies); ``run_finetune`` composes them here. Segmentation
(``openmednet.eval.segmentation``) reuses all but the classifier-specific parts.

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

import logging
import warnings

from openmednet.eval.finetune._config import (
    LEAKAGE_POLICIES,
    TASKS,
    FinetuneConfig,
    FinetuneResult,
)
from openmednet.eval.finetune._data import (
    _make_loaders,
    _split_run,
    check_init_corpus,
    prepare_splits,
    split_loader,
)
from openmednet.eval.finetune._fit import _class_weights, _train, predict_proba
from openmednet.eval.finetune._model import (
    FINETUNE_BN_MOMENTUM,
    _build_model,
    _place_model,
    build_init,
    check_input_contract,
    prepare_for_transfer,
    run_contract,
    training_device,
)
from openmednet.eval.finetune._outputs import (
    _counts,
    _plots,
    _write_predictions,
    finish_run,
    run_metrics,
    start_run,
    write_history,
)
from openmednet.eval.metrics import evaluate_predictions
from openmednet.eval.targets import TargetSet, load_target
from openmednet.models import InitSpec, save_pretrained

__all__ = ["FINETUNE_BN_MOMENTUM", "LEAKAGE_POLICIES", "TASKS", "FinetuneConfig", "FinetuneResult", "build_init",
           "check_init_corpus", "check_input_contract", "predict_proba", "prepare_for_transfer", "prepare_splits",
           "run_contract", "run_finetune", "split_loader", "training_device"]

logger = logging.getLogger(__name__)


def run_finetune(cfg: FinetuneConfig, target: TargetSet | None = None) -> FinetuneResult:
    """Fine-tune and evaluate (see the module docstring); returns the run's metrics.

    Args:
        cfg: the run's configuration.
        target: the already decoded ``cfg.data`` (a study decodes each target once for all its
            arms); ``None`` loads it with ``cfg``'s reading options.

    Raises:
        FileNotFoundError, KeyError, ValueError: bad data, init, or configuration (clear messages).
    """
    InitSpec.parse(cfg.init)  # a malformed or missing init fails now, not after the data is decoded
    if cfg.task == "segmentation":  # the same splits, leakage checks and _train; a U-Net and Dice
        from openmednet.eval.segmentation import run_segmentation

        return run_segmentation(cfg, target)
    if cfg.semi != "none":  # a missing, empty or unreadable folder fails before any output or decoding
        from openmednet.eval.unlabelled import check_unlabelled

        check_unlabelled(cfg.unlabelled)
    out = start_run(cfg)
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
    write_history(out, history)

    # The only time the test split is looked at.
    probs, y_test = predict_proba(model, loaders["test"], dist.device)
    _write_predictions(out, [target.ids[i] for i in idx["test"]], target, y_test, probs)
    test = evaluate_predictions(y_test, probs, target.label_names, n_boot=cfg.n_boot, seed=cfg.seed,
                                groups=[target.groups[i] for i in idx["test"]])
    _plots(out, history, best_epoch, test, y_test, probs, target.label_names)

    metrics = run_metrics(cfg, target, test=test, val_score=("auroc_macro", "val_auroc"), history=history,
                          best_epoch=best_epoch, names={"label_names": list(target.label_names)},
                          counts=_counts(target, splits, idx["train"]), dropped=dropped, pretraining=pretraining,
                          model=model_info)
    if cfg.semi != "none":
        metrics["semi"] = semi_info
    save_pretrained(
        model.cpu(), out / "model", data=(str(cfg.data),), objective=f"finetune:{cfg.strategy}",
        epochs=best_epoch, metrics={m: test[m] for m in ("auroc_macro", "balanced_accuracy", "accuracy", "f1_macro")},
        input_size=(channels, size, size), label_names=target.label_names,
    )
    logger.info("test macro AUROC %.4f (best epoch %d); outputs in %s", test["auroc_macro"], best_epoch, out)
    return finish_run(out, metrics)  # metrics.json last, after the model

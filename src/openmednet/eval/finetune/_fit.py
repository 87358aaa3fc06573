"""Training with model choice on validation (``_train``, on the engine's loop) and class probabilities."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from openmednet.engine.callbacks import EarlyStopping
from openmednet.engine.distributed import DistEnv
from openmednet.engine.loop import fit
from openmednet.engine.optim import build_optimizer, build_scheduler
from openmednet.engine.trainer import LossOutput
from openmednet.eval.finetune._config import FinetuneConfig
from openmednet.eval.metrics import BOOTSTRAP_METRICS
from openmednet.eval.strategies import head_prefix

__all__ = ["predict_proba"]


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


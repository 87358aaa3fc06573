"""Transfer strategies: which weights train, how they start, and at which learning rate.

- ``full``: every weight trains (the usual fine-tuning).
- ``linear_probe``: only the new classifier head trains; the backbone is a fixed feature extractor
  (its BatchNorm statistics are frozen too, see ``freeze_batchnorm_stats``).
- ``freeze_k``: the stem and the first ``k`` blocks are frozen, the rest trains ("freezing the lower
  blocks"). For MedNet a block is one ``MultiBranchBlock`` with the connections entering it; for
  timm models it is one coarse group of ``model.group_matcher(coarse=True)`` (a ResNet stage, a
  DenseNet dense block...).
- ``meanvar``: Transfusion's Mean-Var init (Raghu et al., 2019, "Transfusion: Understanding Transfer
  Learning for Medical Imaging", NeurIPS, section 5): every backbone weight tensor is re-drawn i.i.d.
  from ``N(mean, var)`` of the pretrained tensor, keeping only the per-layer scale of the pretrained
  weights; then everything trains. BatchNorm running statistics are reset, since they described
  the activations of the pretrained weights.

The higher learning rate of the new head (the MedNet authors used 10x) is
``openmednet.engine.optim.build_optimizer(..., head_prefixes=(head_prefix(model),), head_lr_mult=10)``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from openmednet._errors import look_up_option

__all__ = [
    "STRATEGIES",
    "apply_strategy",
    "freeze_batchnorm_stats",
    "head_prefix",
    "layer_groups",
]

logger = logging.getLogger(__name__)

STRATEGIES = ("full", "linear_probe", "freeze_k", "meanvar")

_MEDNET_CONN = re.compile(r"^connections\.c(\d+)_(\d+)\.")
_MEDNET_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def head_prefix(model: nn.Module) -> str:
    """Parameter-name prefix of the classifier head that a new task re-initialises.

    MedNet re-creates both FC layers of its ``ClassifierHead`` for a new task, so its head is
    ``"head."``; for timm models it is the ``classifier`` module of the pretrained cfg (``"fc."``,
    ``"head.fc."``...).
    """
    head = getattr(model, "head", None)
    if head is not None and hasattr(head, "fc1"):
        return "head."
    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    if not name:
        raise ValueError(
            f"cannot tell the classifier head of {type(model).__name__}: give the model a pretrained_cfg "
            f"with a 'classifier' entry (module path of its last linear layer)"
        )
    return f"{name}."


def _is_head(name: str, prefix: str) -> bool:
    return name.startswith(prefix)


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Backbone parameter names in input-to-output order: ``[stem, block 1, block 2, ...]``.

    Head parameters are left out. MedNet: the stem, then each block with the connections that enter
    it. timm models: ``timm.models.group_parameters`` over ``group_matcher(coarse=True)``.

    Raises:
        ValueError: the model is neither a MedNet nor a timm model with a ``group_matcher``.
    """
    prefix = head_prefix(model)
    names = [n for n, _ in model.named_parameters() if not _is_head(n, prefix)]
    if hasattr(model, "connections") and hasattr(model, "blocks") and hasattr(model, "stem"):
        groups: list[list[str]] = [[] for _ in range(len(model.blocks) + 1)]
        for n in names:
            if n.startswith("stem."):
                groups[0].append(n)
            elif m := _MEDNET_BLOCK.match(n):
                groups[int(m.group(1)) + 1].append(n)
            elif m := _MEDNET_CONN.match(n):
                groups[int(m.group(2))].append(n)
            else:
                raise ValueError(f"MedNet parameter '{n}' belongs to no known layer group")
        return groups
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        grouped = group_parameters(model, model.group_matcher(coarse=True))
        groups = [[n for n in grouped[k] if not _is_head(n, prefix)] for k in sorted(grouped)]
        return [g for g in groups if g]  # the classifier's own group is empty without the head
    raise ValueError(
        f"{type(model).__name__} has no layer groups: freeze_k supports MedNet and timm models "
        f"(with group_matcher); use 'full' or 'linear_probe'"
    )


def _named_backbone(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    prefix = head_prefix(model)
    return ((n, p) for n, p in model.named_parameters() if not _is_head(n, prefix))


@torch.no_grad()
def _meanvar_init(model: nn.Module, generator: torch.Generator) -> None:
    for name, p in _named_backbone(model):
        if p.numel() < 2:
            continue  # a single value has no variance; keep it
        mean, std = p.mean().item(), p.std().item()
        p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std + mean)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.reset_running_stats()


def apply_strategy(model: nn.Module, strategy: str, k: int = 0, seed: int = 0) -> dict[str, Any]:
    """Set ``requires_grad`` (and for ``meanvar`` the weights) of ``model`` for a strategy, in place.

    Args:
        model: a freshly built model whose head was already reset for the target classes (call
            once per model: BatchNorm layers frozen here stay pinned to eval mode).
        strategy: one of ``STRATEGIES``.
        k: blocks to freeze after the stem (``freeze_k`` only); 0 freezes the stem alone.
        seed: seed of the ``meanvar`` draws.

    Returns:
        ``{"strategy", "k", "trainable", "total", "frozen_groups"}`` (parameter counts).

    Raises:
        KeyError: unknown strategy. ValueError: ``k`` out of range.
    """
    look_up_option(strategy, STRATEGIES, "strategy")
    groups = layer_groups(model) if strategy == "freeze_k" else []
    if strategy == "freeze_k" and not 0 <= k < len(groups):
        raise ValueError(f"freeze_k: k must lie in [0, {len(groups) - 1}] for this model (blocks), got {k}")
    prefix = head_prefix(model)
    for p in model.parameters():
        p.requires_grad_(True)
    frozen: set[str] = set()
    if strategy == "linear_probe":
        frozen = {n for n, _ in model.named_parameters() if not _is_head(n, prefix)}
    elif strategy == "freeze_k":
        frozen = {n for g in groups[: k + 1] for n in g}
    elif strategy == "meanvar":
        _meanvar_init(model, torch.Generator().manual_seed(seed))
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    freeze_batchnorm_stats(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("strategy %s: %d of %d parameters train", strategy, trainable, total)
    return {"strategy": strategy, "k": k if strategy == "freeze_k" else None, "trainable": trainable,
            "total": total, "frozen_groups": (k + 1) if strategy == "freeze_k" else None}


def _pin_eval(module: nn.Module, args: tuple) -> None:
    module.training = False


def freeze_batchnorm_stats(model: nn.Module) -> int:
    """Pin every BatchNorm whose weights are all frozen to inference behaviour; returns their count.

    A frozen layer must not normalise with batch statistics or update its running statistics from
    the target batches: that would change the "fixed" features of a linear probe from one batch to
    the next. A forward pre-hook sets the layer to eval mode before each call, so it holds whatever
    ``model.train()`` a training loop calls (timm's ``FrozenBatchNorm2d`` would do the same but turns
    the weights into buffers and drops ``num_batches_tracked``, so the fine-tuned model could no
    longer be loaded into a plain architecture).
    """
    pinned = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params) and not getattr(m, "_openmednet_pinned", False):
                m.register_forward_pre_hook(_pin_eval)
                m._openmednet_pinned = True
                pinned += 1
    return pinned

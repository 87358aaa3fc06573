"""Optimizers and learning-rate schedules shared by pre-training and fine-tuning.

- ``build_optimizer``: AdamW, SGD (Nesterov) or LARS (lightly's, the SimCLR choice for large batches),
  with weight decay only on weights of convolutions and linear layers: decaying BN scales and
  biases hurts accuracy (Goyal et al. 2017, "Accurate, Large Minibatch SGD"), and LARS must also
  skip its trust ratio on them. lightly's LARS has no exclusion flag: it applies the trust ratio
  exactly to the groups whose ``weight_decay != 0``, so the no-decay groups (``weight_decay=0``)
  are its exclusions, and ``weight_decay=0`` would turn LARS into plain momentum SGD everywhere
  (refused). Parameters whose name starts with a ``head_prefixes`` entry get
  ``lr * head_lr_mult`` (fine-tuning: the MedNet authors used 10x on the new head).
- ``build_scheduler``: linear warm-up then cosine decay, stepped once per optimizer step (not per
  epoch), so it behaves the same whatever the epoch length or gradient accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from openmednet._errors import look_up_option

__all__ = ["OPTIMIZERS", "build_optimizer", "build_scheduler", "param_groups", "warmup_cosine"]

OPTIMIZERS = ("adamw", "sgd", "lars")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # 1-D tensors are BN/LayerNorm scales and shifts and biases: no weight decay, no LARS adaptation.
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    head_prefixes: Sequence[str] = (),
    head_lr_mult: float = 1.0,
) -> list[dict]:
    """Split trainable parameters into (decay / no decay) x (body / head) groups.

    Args:
        model: the module to optimize; frozen parameters (``requires_grad=False``) are left out.
        weight_decay: decay of conv/linear weights; BN parameters and biases get 0.
        head_prefixes: parameter-name prefixes of the new head (e.g. ``("head.",)``).
        head_lr_mult: learning-rate multiplier of the head groups.

    Returns:
        Non-empty groups, each with ``params``, ``weight_decay``, ``lr_mult`` and ``name``. The
        no-decay groups (``weight_decay=0``) are also the ones lightly's LARS does not adapt.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = any(name.startswith(prefix) for prefix in head_prefixes)
        groups.setdefault((is_head, _no_decay(name, p)), []).append(p)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_mult": head_lr_mult if is_head else 1.0,
            "name": f"{'head' if is_head else 'body'}_{'no_decay' if no_decay else 'decay'}",
        })
    if not out:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    return out


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    head_prefixes: Sequence[str] = (),
    head_lr_mult: float = 1.0,
) -> torch.optim.Optimizer:
    """Build an optimizer over ``param_groups(model, ...)``.

    Args:
        model: module to optimize.
        name: ``"adamw"``, ``"sgd"`` (momentum, Nesterov) or ``"lars"`` (lightly's LARS).
        lr: base learning rate; each group's initial lr is ``lr * lr_mult``.
        weight_decay: decay of conv/linear weights; must be > 0 for LARS, which adapts the learning
            rate only of groups with non-zero decay.
        momentum: SGD/LARS momentum.
        betas: AdamW betas.
        head_prefixes: parameter-name prefixes of the head (see ``param_groups``).
        head_lr_mult: head learning-rate multiplier.

    Raises:
        KeyError: unknown optimizer name (with a suggestion).
        ValueError: ``lr <= 0``, LARS with ``weight_decay == 0``, or no trainable parameter.
    """
    name = look_up_option(name.lower(), OPTIMIZERS, "optimizer")
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    if name == "lars" and weight_decay == 0:
        raise ValueError(
            "optimizer 'lars' with weight_decay=0 would adapt no layer's learning rate (lightly's LARS "
            "applies its trust ratio only where weight_decay != 0): set weight_decay > 0 (e.g. 1e-6, "
            "SimCLR's), or use optimizer 'sgd'"
        )
    groups = param_groups(model, weight_decay, head_prefixes, head_lr_mult)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    from lightly.utils.lars import LARS

    return LARS(groups, lr=lr, momentum=momentum)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate factor at optimizer step ``step``: linear warm-up, then cosine to ``min_ratio``.

    ``step`` counts from 0; the factor is ``(step + 1) / warmup_steps`` during warm-up (never 0, so the
    first step already learns), then ``min_ratio + (1 - min_ratio) * (1 + cos(pi * t)) / 2`` with
    ``t`` going from 0 to 1 over the remaining steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine schedule (``warmup_cosine``) applied to every parameter group.

    Args:
        optimizer: optimizer whose groups' initial ``lr`` (already including ``lr_mult``) is scaled.
        total_steps: optimizer steps of the whole run (epochs x steps per epoch).
        warmup_steps: steps of linear warm-up.
        min_ratio: final lr as a fraction of the initial lr.

    Raises:
        ValueError: non-positive ``total_steps``, negative warm-up or ``min_ratio`` outside [0, 1].
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps} (empty loader or epochs=0?)")
    if warmup_steps < 0 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"need warmup_steps >= 0 and 0 <= min_ratio <= 1, got {warmup_steps}, {min_ratio}")
    warmup_steps = min(warmup_steps, total_steps)
    # The schedule is rebuilt from the config on resume; only step counters go into state_dict.
    fn = partial(warmup_cosine, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

"""FreeMatch's self-adaptive threshold and fairness term (Wang et al. 2023, ICLR, sec. 3.2-3.3).

FixMatch keeps an unlabelled image when its weak view is at least 0.95 confident. A model
fine-tuned on ten labels per class for a few dozen steps rarely is: FixMatch accepted 1-5% of the
unlabelled images on four of our six targets and none on bccd_wbc (docs/results.md), so its
unlabelled term barely trained. FreeMatch replaces the fixed threshold by one that follows the
model's own confidence, per class:

- global threshold ``tau`` = exponential moving average (EMA) of the mean top probability of the
  unlabelled weak views (eq. 5), starting at ``1/K``;
- class estimate ``p(c)`` = EMA of the mean probability of class ``c`` (eq. 6), starting at ``1/K``;
- class threshold ``tau(c) = tau * p(c) / max_c' p(c')`` (eq. 7-8): a class the model predicts less
  gets a lower bar, so a majority class cannot take every pseudo label.

The fairness term (eq. 10) pushes the batch's mean strong-view prediction, normalised by its
histogram, towards the EMA class estimate normalised by the EMA label histogram; the reference
implementation (USB, ``semilearn/algorithms/freematch``) adds ``sum_c p(c) log q(c)`` with weight
``lambda_f`` (0.01, its default).

Deviation, for CPU-sized runs: the paper's EMA momentum 0.999 averages over about 1,000 steps,
which is right for its 2^20-step runs; a fine-tuning run here has 20-200 steps, over which that
average would barely leave its ``1/K`` start, so the default momentum is 0.9 (about ten steps).
Kept in one module because no library we depend on has it (USB is a training framework, not a
component to import); :class:`openmednet.eval.semi.FixMatchLoss` uses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SelfAdaptiveThreshold", "fairness_loss"]


class SelfAdaptiveThreshold:
    """FreeMatch's per-class self-adaptive confidence threshold (module docstring).

    Args:
        num_classes: K.
        momentum: EMA momentum ``lambda`` of eq. 5-6 (the paper's 0.999 suits 2^20-step runs).

    Attributes:
        tau: ``()`` global threshold; ``p_model``: ``(K,)`` EMA class probabilities;
            ``label_hist``: ``(K,)`` EMA histogram of the weak views' predicted classes (for
            :func:`fairness_loss`). All start at ``1/K``.
    """

    def __init__(self, num_classes: int, momentum: float):
        if num_classes < 2 or not 0 <= momentum < 1:
            raise ValueError(f"need num_classes >= 2 and 0 <= momentum < 1, got {num_classes}, {momentum}")
        self.momentum = momentum
        self.tau = torch.tensor(1.0 / num_classes, dtype=torch.float64)
        self.p_model = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
        self.label_hist = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)

    @property
    def class_thresholds(self) -> Tensor:
        """``(K,)`` ``tau * p_model / max(p_model)`` (eq. 8)."""
        return self.tau * self.p_model / self.p_model.max()

    @torch.no_grad()
    def __call__(self, probs: Tensor) -> Tensor:
        """Update the estimates with one unlabelled batch, then say which images count.

        Args:
            probs: ``(B, K)`` softmax probabilities of the weak views.

        Returns:
            ``(B,)`` float mask: 1 where the top probability reaches its class's threshold.
            The update comes first, as in the reference implementation.
        """
        probs = probs.detach().to("cpu", torch.float64)
        conf, pred = probs.max(dim=1)
        m = self.momentum
        self.tau = m * self.tau + (1 - m) * conf.mean()
        self.p_model = m * self.p_model + (1 - m) * probs.mean(dim=0)
        hist = torch.bincount(pred, minlength=len(self.p_model)).to(torch.float64)
        self.label_hist = m * self.label_hist + (1 - m) * hist / hist.sum()
        return (conf >= self.class_thresholds[pred]).float()


def _sum_norm(x: Tensor) -> Tensor:
    return x / x.sum(dim=-1, keepdim=True)


def fairness_loss(probs_strong: Tensor, p_model: Tensor, label_hist: Tensor) -> Tensor:
    """FreeMatch's self-adaptive fairness term (eq. 10) over the accepted strong views.

    Args:
        probs_strong: ``(M, K)`` softmax of the strong views of the images the threshold accepted
            (``M >= 1``); the gradient flows through it.
        p_model, label_hist: ``(K,)`` the threshold's EMA class probabilities and label histogram.

    Returns:
        Scalar ``sum_c target(c) log mean(c)``, with ``target = SumNorm(p_model / label_hist)`` and
        ``mean = SumNorm(mean_i probs_strong / hist of their argmax)``; a class absent from either
        histogram gets weight 0 (the reference's ``1/0 -> 0``). Minimised with weight ``lambda_f``.
    """
    k = probs_strong.shape[1]
    hist = torch.bincount(probs_strong.detach().argmax(dim=1), minlength=k).to(probs_strong.dtype)
    hist = hist / hist.sum()
    target = _sum_norm(p_model.to(probs_strong) * _inverse_or_zero(label_hist.to(probs_strong)))
    mean = _sum_norm(probs_strong.mean(dim=0) * _inverse_or_zero(hist))
    return (target * torch.log(mean + 1e-12)).sum()


def _inverse_or_zero(x: Tensor) -> Tensor:
    return torch.where(x > 0, 1 / x.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))

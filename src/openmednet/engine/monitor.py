"""A cheap transfer monitor for pre-training: k-NN accuracy of pooled features on held-out labels.

Self-supervised loss values say little about how useful the features are; a weighted k-NN
classifier on frozen features (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination"; the DINO evaluation) tracks transfer quality at the cost of one forward
pass over a few hundred images and no training. Features are L2-normalised, neighbours are found
by cosine similarity, votes are weighted by ``exp(sim / T)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["KnnMonitor", "balanced_accuracy", "knn_predict"]


def knn_predict(
    bank: Tensor, bank_labels: Tensor, query: Tensor, num_classes: int, k: int = 20, temperature: float = 0.07
) -> Tensor:
    """Weighted k-NN class predictions.

    Args:
        bank: ``(N, D)`` L2-normalised features of labelled images.
        bank_labels: ``(N,)`` int64 labels in ``[0, num_classes)``.
        query: ``(M, D)`` L2-normalised features to classify.
        num_classes: size of the label space.
        k: neighbours (clipped to ``N``).
        temperature: vote weight ``exp(cosine / temperature)``.

    Returns:
        ``(M,)`` int64 predicted labels.
    """
    k = min(k, bank.shape[0])
    sim = query @ bank.T  # (M, N) cosine similarities
    top_sim, top_idx = sim.topk(k, dim=1)
    weights = (top_sim / temperature).exp()
    votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=query.device)
    votes.scatter_add_(1, bank_labels[top_idx], weights)
    return votes.argmax(dim=1)


def balanced_accuracy(truth: Tensor, pred: Tensor) -> float:
    """Mean per-class recall over the classes present in ``truth`` (``sklearn``'s definition).

    Written out because importing scikit-learn costs seconds in every training process, for a
    three-line formula (tests check it against ``sklearn.metrics.balanced_accuracy_score``).
    """
    classes = truth.unique()
    return float(torch.stack([(pred[truth == c] == c).float().mean() for c in classes]).mean())


class KnnMonitor:
    """k-NN top-1 and balanced accuracy of a backbone's pooled features on a held-out split.

    The images are preprocessed once and held as tensors (a few hundred 64 px images are a few MB),
    so a call costs two forward passes in eval mode and draws nothing from the global RNGs (it does
    not disturb exact resume).

    Args:
        bank_images: ``(N, C, H, W)`` float, normalised like the training input (e.g. train split).
        bank_labels: ``(N,)`` labels (any integer ids; they are re-indexed).
        query_images: ``(M, C, H, W)`` held-out images (e.g. val split, other patients).
        query_labels: ``(M,)`` labels in the same id space.
        k: neighbours.
        batch_size: forward batch size.
        prefix: metric-name prefix.
    """

    def __init__(
        self,
        bank_images: Tensor,
        bank_labels: Tensor,
        query_images: Tensor,
        query_labels: Tensor,
        k: int = 20,
        batch_size: int = 256,
        prefix: str = "knn/",
    ):
        if len(bank_images) == 0 or len(query_images) == 0:
            raise ValueError(
                f"k-NN monitor needs labelled bank and query images, got {len(bank_images)} and {len(query_images)}: "
                "the corpus needs labelled images in its train and val splits (or disable the monitor)"
            )
        classes, labels = torch.unique(torch.cat([bank_labels, query_labels]).long(), return_inverse=True)
        self.num_classes = len(classes)
        self.bank_images, self.query_images = bank_images, query_images
        self.bank_labels, self.query_labels = labels[: len(bank_labels)], labels[len(bank_labels):]
        self.k, self.batch_size, self.prefix = k, batch_size, prefix

    @torch.no_grad()
    def _features(self, model: nn.Module, images: Tensor) -> Tensor:
        device = next(model.parameters()).device
        chunks = [model(images[i : i + self.batch_size].to(device)).float() for i in range(0, len(images), self.batch_size)]
        return nn.functional.normalize(torch.cat(chunks), dim=1)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """Evaluate ``model`` (a backbone returning ``(B, D)`` pooled features, or a module with a
        ``backbone`` attribute); its train/eval mode is restored afterwards.

        Returns:
            ``{prefix + "top1": ..., prefix + "balanced_acc": ...}``, both in ``[0, 1]``.
        """
        backbone = getattr(model, "backbone", model)
        was_training = backbone.training
        backbone.eval()
        try:
            bank = self._features(backbone, self.bank_images)
            query = self._features(backbone, self.query_images)
        finally:
            backbone.train(was_training)
        pred = knn_predict(bank, self.bank_labels.to(bank.device), query, self.num_classes, self.k).cpu()
        truth = self.query_labels
        return {
            f"{self.prefix}top1": float((pred == truth).float().mean()),
            f"{self.prefix}balanced_acc": balanced_accuracy(truth, pred),
        }

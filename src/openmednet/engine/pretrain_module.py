"""What pre-training minimises: the supervised multi-source heads and the module that runs the
backbone once per step and sums the objective's parts (``openmednet.engine.pretrain`` builds them
from a ``PretrainConfig``; the SSL and distillation parts live in ``openmednet.ssl``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from openmednet._errors import look_up_option
from openmednet.engine.trainer import LossOutput

__all__ = ["HEAD_KINDS", "PretrainModule", "SupervisedHeads", "pretrain_loss"]

HEAD_KINDS = ("union", "per_source")


class SupervisedHeads(nn.Module):
    """Linear classifier(s) on pooled features for multi-source labels, masking unlabelled images.

    Args:
        in_dim: feature size.
        label_names: the corpus' global label space, ``"<source>/<label>"``.
        kind: ``"union"`` (one softmax over all labels) or ``"per_source"`` (one per source).
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(self, in_dim: int, label_names: list[str], kind: str = "union", label_smoothing: float = 0.0):
        super().__init__()
        self.kind = look_up_option(kind, HEAD_KINDS, "objective.heads")
        self.label_smoothing = label_smoothing
        if not label_names:
            raise ValueError("the supervised objective needs labels, but the corpus has none: use objective=simclr")
        sources = sorted({name.split("/", 1)[0] for name in label_names})
        if self.kind == "union":
            self.heads = nn.ModuleDict({"union": nn.Linear(in_dim, len(label_names))})
            head_of = [0] * len(label_names)
            local_of = list(range(len(label_names)))
        else:
            members = {s: [i for i, n in enumerate(label_names) if n.split("/", 1)[0] == s] for s in sources}
            self.heads = nn.ModuleDict({s: nn.Linear(in_dim, len(members[s])) for s in sources})
            head_of, local_of = [0] * len(label_names), [0] * len(label_names)
            for h, s in enumerate(sources):
                for j, i in enumerate(members[s]):
                    head_of[i], local_of[i] = h, j
        # Lookup tables global label -> (head, index inside the head); rebuilt from the manifest,
        # so not persistent (the state dict holds only learned weights).
        self.register_buffer("head_of", torch.tensor(head_of, dtype=torch.long), persistent=False)
        self.register_buffer("local_of", torch.tensor(local_of, dtype=torch.long), persistent=False)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over labelled images.

        Args:
            features: ``(B, in_dim)``.
            labels: ``(B,)`` global label ids, ``-1`` = unlabelled.

        Returns:
            Scalar; an exact zero that still touches every head when no image is labelled (DDP
            expects every parameter in every backward).
        """
        labelled = labels >= 0
        safe = labels.clamp(min=0)
        total = features.new_zeros(())
        for h, head in enumerate(self.heads.values()):
            # Every head sees every image, its loss is masked: each parameter joins every backward.
            logits = head(features).float()
            mask = labelled & (self.head_of[safe] == h)
            ce = nn.functional.cross_entropy(
                logits, self.local_of[safe] * mask, reduction="none", label_smoothing=self.label_smoothing
            )
            total = total + (ce * mask).sum()
        return total / labelled.sum().clamp(min=1)


class PretrainModule(nn.Module):
    """Backbone plus objective heads; ``forward`` returns the losses (one DDP forward per step).

    Args:
        backbone: model returning pooled features ``(B, D)`` (``create_model(..., num_classes=0)``).
        supervised: ``SupervisedHeads`` or ``None``.
        ssl: SSL objective (``openmednet.ssl``) or ``None``.
        sup_weight, ssl_weight: weights of the two losses when both are present.
        distill: ``FeatureDistillation`` (``openmednet.ssl.distill``) or ``None``.
        distill_weight: weight of the distillation loss.
    """

    def __init__(
        self,
        backbone: nn.Module,
        supervised: SupervisedHeads | None = None,
        ssl: nn.Module | None = None,
        sup_weight: float = 1.0,
        ssl_weight: float = 1.0,
        distill: nn.Module | None = None,
        distill_weight: float = 1.0,
    ):
        super().__init__()
        if supervised is None and ssl is None and distill is None:
            raise ValueError("PretrainModule needs a supervised head, an SSL objective or a distillation target")
        self.backbone, self.supervised, self.ssl, self.distill = backbone, supervised, ssl, distill
        self.sup_weight, self.ssl_weight, self.distill_weight = sup_weight, ssl_weight, distill_weight

    def forward(self, images: Tensor | list[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """Losses of one batch.

        Args:
            images: ``(B, C, H, W)`` or a list of views, each ``(B, C, H, W)``.
            labels: ``(B,)`` global label ids (-1 = unlabelled).

        Returns:
            ``{"loss": total, "sup_loss": ..., "ssl_loss": ...}`` (the parts present).
        """
        views = list(images) if isinstance(images, (list, tuple)) else [images]
        # All views in one backbone call: one forward per step (DDP) and larger BN batches.
        stacked = torch.cat(views)
        if self.distill is not None and self.distill.target == "map":
            # The map target needs the last feature map; the other parts take its pooled features.
            feature_map = self.backbone.forward_features(stacked)
            features = self.backbone.forward_head(feature_map, pre_logits=True)
        else:
            feature_map, features = None, self.backbone(stacked)
        out: dict[str, Tensor] = {}
        total = features.new_zeros((), dtype=torch.float32)
        if self.supervised is not None:
            out["sup_loss"] = self.supervised(features, labels.repeat(len(views)))
            total = total + self.sup_weight * out["sup_loss"]
        if self.ssl is not None:
            out["ssl_loss"] = self.ssl(features, n_views=len(views))
            total = total + self.ssl_weight * out["ssl_loss"]
        if self.distill is not None:
            out["distill_loss"] = self.distill(stacked, features if feature_map is None else feature_map)
            total = total + self.distill_weight * out["distill_loss"]
        out["loss"] = total
        return out


def pretrain_loss(model: nn.Module, batch: Any) -> LossOutput:
    """``compute_loss`` for ``fit``: a ``(images, label, source)`` batch through ``PretrainModule``."""
    images, labels = batch[0], batch[1]
    out = model(images, labels)
    n = labels.shape[0]
    return LossOutput(out["loss"], n, {k: v.detach() for k, v in out.items() if k != "loss"})

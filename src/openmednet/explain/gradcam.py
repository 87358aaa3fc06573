"""Grad-CAM class-activation maps and PNG overlays.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017): weight each channel ``k`` of a feature map ``A`` by the spatial mean of
``d score_c / d A_k``, sum, keep the positive part. The normalisation follows the widely used
``pytorch-grad-cam`` package (``scale_cam_image``: subtract the minimum, divide by ``1e-7 + max``)
so maps are comparable with it; ``tests/explain`` checks the two agree.

Why not call ``pytorch-grad-cam`` directly: it returns NumPy maps resized by OpenCV and keeps
activations on the CAM object, so one object cannot serve concurrent requests. Here each call
registers its own forward hook on the target layer, captures the feature map of its own thread's
forward pass, and removes the hook before returning (also on errors): between calls the model
carries no hook, so it can still be copied, pickled or saved, and several ``GradCAM`` objects on
one model do not stack hooks. The gradient is taken with ``torch.autograd.grad``, which needs no
backward hooks and leaves parameter ``.grad`` untouched.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MIN_CAM_SIDE", "GradCAM", "default_target_layer", "overlay_cam", "overlay_png"]

_EPS = 1e-7  # same constant as pytorch-grad-cam's scale_cam_image


#: Smallest CAM side worth showing: VGG/ResNet Grad-CAMs at 224 px are 14x14 / 7x7.
MIN_CAM_SIDE = 7


def default_target_layer(model: nn.Module, input_size: Sequence[int] | None = None) -> str:
    """Name of the module whose output Grad-CAM uses by default.

    The last ``feature_info`` stage has the most class-specific features, but at small inputs its
    map is too coarse to point at anything (MedNet at 64 px: 4x4, each cell a quarter of the image
    side). Given ``input_size``, the deepest stage whose map is at least ``MIN_CAM_SIDE`` pixels on
    its shorter side is chosen instead (MedNet: last stage from 112 px up, the 8x8 stage-3 map at
    64 px).

    Args:
        model: a model with timm-style ``feature_info`` (``module``, ``reduction`` per stage).
        input_size: ``(H, W)`` or ``(C, H, W)`` of the inputs; ``None`` = the last stage.

    Raises:
        ValueError: the model has no ``feature_info`` (pass ``target_layer`` explicitly).
    """
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(
            f"{type(model).__name__} has no feature_info: pass target_layer='<module name>' "
            "(e.g. one of the names in model.named_modules())"
        )
    if input_size is None:
        return info[-1]["module"]
    side = min(input_size[-2:])
    fine_enough = [stage for stage in info if math.ceil(side / stage["reduction"]) >= MIN_CAM_SIDE]
    return (fine_enough or info[:1])[-1]["module"]


class GradCAM:
    """Grad-CAM over one layer of a classifier.

    Args:
        model: a classifier returning logits ``(B, num_classes)``. Put it in ``eval()`` mode first:
            dropout and batch statistics in train mode make maps random.
        target_layer: module name (``"blocks.7"``) or module whose output ``(B, C, h, w)`` is
            explained; default: :func:`default_target_layer` for ``input_size``.
        input_size: ``(H, W)`` or ``(C, H, W)`` of the inputs, to pick the default layer.

    Calling the object is thread-safe: each call captures its own thread's feature map. The
    model is left unchanged: the forward hook exists only during a call.

    Example:
        >>> cam = GradCAM(model.eval())(x, target=1)   # (B, H, W) in [0, 1]
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        input_size: Sequence[int] | None = None,
    ):
        self.model = model
        if target_layer is None:
            target_layer = default_target_layer(model, input_size)
        if isinstance(target_layer, str):
            modules = dict(model.named_modules())
            if target_layer not in modules:
                raise ValueError(
                    f"target_layer '{target_layer}' is not a module of {type(model).__name__} "
                    f"(e.g. {', '.join(list(modules)[1:6])}, ...)"
                )
            target_layer = modules[target_layer]
        self.target_layer = target_layer

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[dict[str, Tensor]]:
        """Hook the target layer for one forward pass of this thread; the hook is always removed.

        Yields:
            A dict that receives ``"activation"``, the layer's ``(B, C, h, w)`` output, as the
            forward pass runs.
        """
        owner = threading.get_ident()
        captured: dict[str, Tensor] = {}

        def capture(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            if threading.get_ident() != owner:  # another thread's forward pass through the same model
                return None
            if not isinstance(output, Tensor) or output.ndim != 4:
                raise ValueError(
                    f"target layer output must be a (B, C, h, w) tensor, got "
                    f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}: choose a conv/stage module"
                )
            if not output.requires_grad:  # frozen model: make the feature map itself the grad leaf
                output = output.detach().requires_grad_(True)
            captured["activation"] = output
            return output

        handle = self.target_layer.register_forward_hook(capture)
        try:
            yield captured
        finally:
            handle.remove()

    def close(self) -> None:
        """Nothing to release: hooks live only during a call. Kept for callers of the old API."""

    def __enter__(self) -> GradCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(
        self,
        x: Tensor,
        target: int | Sequence[int] | Tensor | None = None,
        *,
        upsample: bool = True,
    ) -> Tensor:
        """Class-activation maps for a batch.

        Args:
            x: model input ``(B, C, H, W)``, already preprocessed as the model expects.
            target: class index per image (an int applies to all); ``None`` = predicted class.
            upsample: resize maps to ``(H, W)`` bilinearly; ``False`` returns the layer's ``(h, w)``.

        Returns:
            ``(B, H, W)`` (or ``(B, h, w)``) float maps in [0, 1], 1 at each map's maximum; an
            all-zero map means no positive evidence for the class in that layer.
        """
        return self.compute(x, target, upsample=upsample)[0]

    def compute(
        self,
        x: Tensor,
        target: int | Sequence[int] | Tensor | None = None,
        *,
        upsample: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Like calling the object, but also return the logits ``(B, num_classes)`` of the same pass.

        Callers that need both (a predictor showing probabilities and CAMs) save a forward pass.
        """
        if self.model.training:
            warnings.warn("GradCAM on a model in train mode: call model.eval() for stable maps", stacklevel=2)
        with self._capturing() as captured, torch.enable_grad():
            logits = self.model(x)
            activation = captured.get("activation")
            if activation is None:
                raise ValueError("the target layer did not run in forward(): choose a layer on the path")
            targets = self._targets(target, logits)
            score = logits.gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, activation)
        weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): alpha_k^c of the paper
        cam = F.relu((weights * activation.detach()).sum(dim=1))  # (B, h, w)
        cam = cam - cam.amin(dim=(1, 2), keepdim=True)
        cam = cam / (_EPS + cam.amax(dim=(1, 2), keepdim=True))
        if upsample:
            cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return cam.clamp_(0.0, 1.0), logits.detach()

    @staticmethod
    def _targets(target: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
        batch, num_classes = logits.shape
        if target is None:
            return logits.detach().argmax(dim=1)
        t = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"got {t.numel()} targets for a batch of {batch}: pass one per image or one int")
        if (t < 0).any() or (t >= num_classes).any():
            raise ValueError(f"target classes {t.tolist()} out of range for {num_classes} classes")
        return t


def overlay_cam(image: np.ndarray, cam: np.ndarray | Tensor, alpha: float = 0.45, colormap: str = "jet") -> np.ndarray:
    """Blend a CAM, coloured with a matplotlib colormap, over an image.

    Args:
        image: ``(H, W)`` gray or ``(H, W, 3)`` RGB ``uint8``.
        cam: ``(h, w)`` map in [0, 1]; resized bilinearly to ``(H, W)`` when sizes differ.
        alpha: weight of the heat map (0 = image only, 1 = heat map only).
        colormap: matplotlib colormap name.

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB overlay.
    """
    import matplotlib

    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    cam_t = torch.as_tensor(np.asarray(cam, dtype=np.float32) if not isinstance(cam, Tensor) else cam).float()
    if cam_t.ndim != 2:
        raise ValueError(f"cam must be (h, w), got shape {tuple(cam_t.shape)}")
    h, w = image.shape[:2]
    if cam_t.shape != (h, w):
        cam_t = F.interpolate(cam_t[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    heat = matplotlib.colormaps[colormap](cam_t.clamp(0, 1).cpu().numpy())[..., :3]  # (H, W, 3) in [0, 1]
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    blended = (1.0 - alpha) * rgb.astype(np.float32) / 255.0 + alpha * heat
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def overlay_png(image: np.ndarray, cam: np.ndarray | Tensor, alpha: float = 0.45, colormap: str = "jet") -> bytes:
    """:func:`overlay_cam` encoded as PNG bytes (write them with ``openmednet.utils.atomic_write_bytes``)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(overlay_cam(image, cam, alpha, colormap)).save(buf, format="PNG")
    return buf.getvalue()

"""Explanations: Grad-CAM class-activation maps and PNG overlays."""

from openmednet.explain.gradcam import (
    GradCAM,
    default_target_layer,
    overlay_cam,
    overlay_png,
)

__all__ = ["GradCAM", "default_target_layer", "overlay_cam", "overlay_png"]

"""Golden outputs: pooled features of embedded demo images for every shipped weight set.

Why: a user (or CI) who loads ``mednet_gray`` with their own preprocessing cannot tell a subtly
wrong pipeline (channels, size, normalisation, interpolation) from a working one: the network
still returns numbers. Each shipped weight set has a small record in ``assets/golden/`` (written by
``scripts/make_golden.py``): the first pooled features of a few embedded, permissively licensed
images (``assets/golden/ATTRIBUTION.md``) read and preprocessed exactly as ``openmednet predict``
does (reader -> model channels -> short-side resize + centre crop to the card's ``input_size`` ->
the card's normalisation). ``check_golden`` recomputes them; ``tests/models/test_golden.py``
pins every shipped set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["GOLDEN_ATOL", "check_golden", "golden_dir", "golden_features", "golden_record", "golden_images"]

#: Absolute tolerance on each recorded feature. fp32 CPU kernels differ between BLAS builds and
#: instruction sets by ~1e-6 relative; a preprocessing mistake moves features by > 1e-2.
GOLDEN_ATOL = 1e-3
#: Features recorded per image (the pooled vector's first N values, plus its mean and L2 norm).
N_RECORDED = 8


def golden_dir() -> Path:
    """The package's ``assets/golden`` folder (images and records)."""
    return Path(str(resources.files("openmednet") / "assets" / "golden"))


def golden_images(channels: int) -> list[Path]:
    """The embedded demo images for 1- (``gray_*.png``) or 3-channel (``color_*.png``) models."""
    prefix = "gray_" if channels == 1 else "color_"
    return sorted(golden_dir().glob(f"{prefix}*.png"))


def _preprocess(path: Path, cfg: Any) -> torch.Tensor:
    """``(C, H, W)`` input exactly as ``predict`` builds it: the first image of the file through
    the one evaluation pipeline (``openmednet.engine.inputs.EvalInputs``)."""
    from openmednet.data.readers import read_images
    from openmednet.engine.inputs import EvalInputs

    image, _ = next(iter(read_images(path)))
    return EvalInputs(cfg)(image)


@torch.no_grad()
def golden_features(model: nn.Module, paths: list[Path]) -> torch.Tensor:
    """Pooled features ``(N, D)`` of ``paths`` through ``model`` (``num_classes=0``, eval mode)."""
    model.eval()
    batch = torch.stack([_preprocess(p, model.pretrained_cfg) for p in paths])
    return model(batch).float()


@dataclass(frozen=True)
class GoldenRecord:
    """What ``make_golden.py`` stores: per image the first features, their mean and L2 norm."""

    weight_set: str
    input_size: tuple[int, int, int]
    images: dict[str, dict[str, Any]]

    def to_json(self) -> str:
        return json.dumps(
            {"weight_set": self.weight_set, "input_size": list(self.input_size), "atol": GOLDEN_ATOL,
             "images": self.images}, indent=1,
        ) + "\n"


def golden_record(weight_set: str, model: nn.Module) -> GoldenRecord:
    """Compute the record of ``model`` (loaded as ``weight_set``) on its channel's demo images."""
    paths = golden_images(int(model.pretrained_cfg.input_size[0]))
    if not paths:
        raise FileNotFoundError(f"no demo images in {golden_dir()} (the package's assets are incomplete)")
    feats = golden_features(model, paths)
    images = {
        p.name: {
            "first": [round(float(v), 6) for v in f[:N_RECORDED]],
            "mean": round(float(f.mean()), 6),
            "l2": round(float(f.norm()), 6),
        }
        for p, f in zip(paths, feats)
    }
    return GoldenRecord(weight_set, tuple(int(v) for v in model.pretrained_cfg.input_size), images)


def check_golden(weight_set: str, model: nn.Module, record_path: Path | None = None) -> list[str]:
    """Compare ``model`` with its stored record; returns the mismatches (empty = reproduced).

    Raises:
        FileNotFoundError: no record for ``weight_set``.
    """
    path = record_path or golden_dir() / f"{weight_set}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no golden record for {weight_set} at {path}: run scripts/make_golden.py")
    stored = json.loads(path.read_text())
    now = golden_record(weight_set, model)
    errors = []
    if list(now.input_size) != stored["input_size"]:
        errors.append(f"input_size {list(now.input_size)} != recorded {stored['input_size']}")
    if set(now.images) != set(stored["images"]) or not stored["images"]:
        errors.append(f"demo images {sorted(now.images)} differ from the recorded {sorted(stored['images'])}")
    atol = float(stored.get("atol", GOLDEN_ATOL))
    for name, want in stored["images"].items():
        got = now.images.get(name)
        if got is None:
            errors.append(f"{name}: demo image missing")
            continue
        pairs = [*zip(got["first"], want["first"]), (got["mean"], want["mean"])]
        worst = max(abs(a - b) for a, b in pairs)
        # The L2 norm sums D squares: compare it relatively.
        rel_l2 = abs(got["l2"] - want["l2"]) / max(abs(want["l2"]), 1e-12)
        if worst > atol or rel_l2 > atol:
            errors.append(f"{name}: max feature difference {worst:.2e}, L2 relative difference {rel_l2:.2e} (atol {atol})")
    return errors

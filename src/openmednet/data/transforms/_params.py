"""Every training augmentation parameter, defined once (sources in ``openmednet.data.transforms``).

``BatchAugment`` draws from these, the per-image colour operations take them as defaults, and the
test oracle (tests/data/augment_reference.py) builds torchvision's ops from them.
"""

from __future__ import annotations

__all__ = [
    "AUGMENTS", "BRIGHTNESS", "CONTRAST", "CROP_RATIO", "CROP_SCALE", "GAMMA", "GAMMA_P", "HED_P", "HED_SIGMA",
    "HFLIP_P", "HUE", "ROTATION_DEGREES", "SATURATION",
]

#: ``augment`` values: ``gray`` (geometry + brightness, contrast, gamma) or ``color`` (+ saturation, hue, HED).
AUGMENTS = ("gray", "color")

# Geometry.
CROP_SCALE = (0.5, 1.0)  #: area range of the random crop (ImageNet's 0.08 misses small lesions)
CROP_RATIO = (3 / 4, 4 / 3)  #: aspect range of the crop, drawn log-uniformly (RandomResizedCrop's)
HFLIP_P = 0.5  #: probability of a horizontal flip (when flips are on)
ROTATION_DEGREES = 10.0  #: rotation drawn uniformly in +-this

# Photometric: factors drawn uniformly in [1 - s, 1 + s], hue in [-HUE, HUE] turns.
BRIGHTNESS = 0.2
CONTRAST = 0.2
SATURATION = 0.2
HUE = 0.05
GAMMA = (0.8, 1.25)  #: gamma range, drawn log-uniformly
GAMMA_P = 0.5  #: probability of a gamma correction
HED_SIGMA = 0.05  #: HED stain jitter strength (Tellez's "HED-light")
HED_P = 0.5  #: probability of HED stain jitter

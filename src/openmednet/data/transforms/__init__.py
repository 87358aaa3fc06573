"""Image transforms: uint8 ``(C, H, W)`` tensors in, normalised float tensors out.

``build_transform`` turns a weight set's input contract (``PretrainedCfg`` or an equivalent mapping:
``input_size``, ``mean``, ``std``, ``interpolation``) into a ``torchvision.transforms.v2`` pipeline,
so the preprocessing travels with the weights (torchvision's ``Weights.transforms`` habit).

Training augmentation, per version (each choice and its source):

- Both versions, geometry (on uint8, before the float conversion, because uint8 resampling is
  the fastest path of torchvision's CPU kernels):

  - ``RandomResizedCrop(scale=(0.5, 1))``: the standard ImageNet crop (Szegedy et al. 2015) with a
    higher minimum area than its 0.08, because a lesion or organ can fill a small part of a medical
    image and an 8 % crop often misses it (SSL objectives that want harder views pass ``crop_scale``).
  - Horizontal flip, p = 0.5, **on by default**. Most pre-training images tolerate it (a chest X-ray
    flipped is still a chest X-ray to a feature extractor), but it destroys laterality: situs
    (heart on the left), "left/right knee" or DICOM orientation labels. Pass ``hflip=False`` for
    targets whose labels depend on side. No vertical flip: anatomy has a fixed up/down.
  - ``RandomRotation(+-10 deg)``, bilinear, zero fill: patient positioning varies by a few degrees;
    larger angles move anatomy to places it never is and fill corners with black.

- Gray (``augment="gray"``), photometric, on float values in [0, 1]:

  - brightness and contrast factors in ``[0.8, 1.2]``: exposure and window differences between
    scanners and sites.
  - random gamma in ``[0.8, 1.25]`` (log-uniform, so brightening and darkening are equally likely),
    p = 0.5: the non-linear intensity response differences of detectors and of DICOM VOI LUTs
    (nnU-Net's gamma augmentation uses a similar range, 0.7-1.5).
  - no colour jitter: the same factor is applied to every channel, so a gray image replicated to
    three channels stays gray.

- Colour (``augment="color"``): the gray operations plus

  - saturation factor in ``[0.8, 1.2]`` and hue shift of ``+-0.05`` turns (:class:`FastColorJitter`,
    a fused equivalent of torchvision's ``ColorJitter``): mild, because colour carries diagnostic meaning in
    dermoscopy (blue-white veil) and blood smears (stain affinity); HSV perturbation is one of the
    two best-performing colour augmentations in Tellez et al. 2019.
  - H&E stain jitter (``HEDJitter``), p = 0.5: each channel of the haematoxylin-eosin-DAB
    decomposition (Ruifrok & Johnston 2001, the matrix of ``skimage.color.rgb2hed``) is scaled by
    ``U(1 - s, 1 + s)`` and shifted by ``U(-s, s)``, ``s = 0.05`` ("HED-light"), as proposed by
    Tellez et al. 2018 (IEEE TMI 37(9), mitosis detection) and found among the best colour
    augmentations by Tellez et al. 2019 (Medical Image Analysis 58, 101544). It models staining
    variation between labs; on non-histology colour images it acts as a mild colour perturbation.

Evaluation: resize of the shorter side to ``image_size`` and a centre crop, nothing random.

Randomness comes from torch's global generator (so ``torch.manual_seed`` makes a pipeline
reproducible), or, for ``BatchAugment.batch``, from one seed per image (the samplers' seeded keys,
see ``openmednet.data.samplers``).

One implementation: :class:`BatchAugment` (``build_transform(..., train=True)``) draws each
image's parameters (from its seed) and applies them to a whole batch with a few tensor ops (crop,
flip and rotation as one ``grid_sample``; photometric factors broadcast). ``CorpusDataset`` and
``LabelledDataset`` call it from ``__getitems__``, which the DataLoader uses for every batch; called
on one image it is a batch of one. It replaced a per-image ``v2.Compose`` of torchvision's
transforms because at 64 px MedNet trains at about 175 img/s on an idle 2-core machine (bf16 on
AMX) and the per-image pipeline fed only 6-9x that from one core (``benchmarks/bench_loader.py``;
docs/benchmarks.md, "Loader"). That pipeline now lives in tests/data/augment_reference.py, the
oracle ``BatchAugment``'s operations and parameter distributions are tested against, and the
baseline of the loader benchmark.

Layout: ``_params`` (every augmentation parameter, once), ``_contract`` (channels, the uint8
check, reading a contract), ``_color`` (H&E stain space, hue/saturation matrices and the per-image
colour transforms ``FastColorJitter``, ``RandomGamma``, ``HEDJitter``), ``_batch``
(``BatchAugment``), ``_factory`` (``build_transform``, ``MultiViewTransform``).
"""

from __future__ import annotations

# Each module's __all__ names its public API once; the package re-exports them as they are.
from openmednet.data.transforms import _batch, _color, _contract, _factory, _params
from openmednet.data.transforms._batch import *
from openmednet.data.transforms._color import *
from openmednet.data.transforms._contract import *
from openmednet.data.transforms._factory import *
from openmednet.data.transforms._params import *

__all__ = []
__all__ += _params.__all__
__all__ += _contract.__all__
__all__ += _color.__all__
__all__ += _batch.__all__
__all__ += _factory.__all__

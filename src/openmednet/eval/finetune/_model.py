"""The model half of a fine-tuning run: the init, its input contract, the transfer preparation, the device."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from openmednet.engine.distributed import DistEnv
from openmednet.engine.precision import resolve_precision
from openmednet.eval.finetune._config import FinetuneConfig
from openmednet.eval.strategies import apply_strategy, head_prefix
from openmednet.eval.targets import TargetSet
from openmednet.models import (
    InitSpec,
    WeightsUnavailableError,
    create_model,
    get_pretrained_cfg,
    load_pretrained,
)

__all__ = ["FINETUNE_BN_MOMENTUM", "build_init", "check_input_contract", "prepare_for_transfer", "run_contract",
           "training_device"]


def build_init(init: str, num_classes: int, data_channels: int, arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a run starts from (see the module docstring for ``init``).

    Returns:
        ``(model, info)`` where ``info`` records ``init``, ``architecture`` and ``pretrained``.

    Raises:
        KeyError: unknown architecture or weight set. FileNotFoundError: missing weights path.
        ValueError: weights that cannot be obtained offline, or a bare file without ``arch``.
    """
    spec = InitSpec.parse(init).resolve(data_channels)
    if spec.kind == "path":
        path = spec.path
        if path.is_dir() or path.suffix == ".json":
            model = load_pretrained(path, num_classes=num_classes)
        elif arch is None:
            raise ValueError(f"init {path} is a bare weights file: also give its architecture (arch='mednet_gray', --arch)")
        else:
            model = create_model(arch, pretrained_file=path, num_classes=num_classes)
        return model, {"init": init, "architecture": model.pretrained_cfg.meta.get("architecture", arch), "pretrained": True}
    name, pretrained = spec.name, spec.pretrained
    scratch_hint = f"to train '{name}' from random weights use init='scratch:{name}'"
    arch_args: dict[str, Any] = {}
    if not pretrained and spec.tag is not None:
        # Random weights shaped like a weight set (its width), not like the architecture's default.
        weights_cfg = get_pretrained_cfg(name)
        arch_args = {k: v for k, v in weights_cfg.meta.get("model_args", {}).items() if k not in ("num_classes", "in_chans")}
        name = spec.arch
    try:
        model = create_model(name, pretrained=pretrained, num_classes=num_classes, **arch_args)
    except WeightsUnavailableError as e:
        raise ValueError(f"{e}; {scratch_hint}") from e
    except KeyError as e:
        if pretrained and "no pretrained weights" in str(e):
            raise KeyError(f"{e.args[0]}; {scratch_hint}") from None
        raise
    return model, {"init": init, "architecture": spec.arch, "pretrained": pretrained}


#: BatchNorm momentum while fine-tuning (PyTorch's default).
FINETUNE_BN_MOMENTUM = 0.1


def prepare_for_transfer(model: nn.Module) -> dict[str, Any]:
    """Make every init start its new task the same way, whatever library built it.

    - The new head's linear layers get PyTorch's default initialisation
      (``nn.Linear.reset_parameters``, uniform in ``+-1/sqrt(fan_in)``). timm's TF-ported models
      (EfficientNet-Lite0) initialise a classifier uniformly in ``+-1/sqrt(num_classes)``, tuned
      for 1000 classes: with 2 classes that is +-0.71 and the first logits reach +-40.
    - BatchNorm momentum is set to ``FINETUNE_BN_MOMENTUM``. The TF ports use 0.01 (TensorFlow's
      0.99 decay, fitted to ~100k ImageNet steps); a fine-tuning run of a few hundred steps would
      then evaluate with running statistics that are still mostly ImageNet's.

    Returns:
        ``{"head_reset": n linear layers, "bn_momentum": value}`` for the run's metrics.
    """
    prefix = head_prefix(model)
    heads = [m for n, m in model.named_modules() if f"{n}.".startswith(prefix) and isinstance(m, nn.Linear)]
    for m in heads:
        m.reset_parameters()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = FINETUNE_BN_MOMENTUM
    return {"head_reset": len(heads), "bn_momentum": FINETUNE_BN_MOMENTUM}


def check_input_contract(model: nn.Module, data_channels: int, image_size: int | None) -> tuple[int, int]:
    """The model's input channels and the run's image size, from the model's ``pretrained_cfg``.

    Gray data for a 3-channel model (the gray plane is repeated) and colour data for a 1-channel
    model (converted to luma) are warned conversions.

    Raises:
        ValueError: ``image_size`` below the model's minimum input size.
    """
    cfg = model.pretrained_cfg
    channels = int(cfg.input_size[0])
    size = int(image_size or cfg.input_size[-1])
    if size < cfg.min_input_size[-1]:
        raise ValueError(f"image_size {size} is below the model's minimum {cfg.min_input_size[-1]}: use a larger image_size")
    if data_channels == 1 and channels == 3:
        warnings.warn("gray data, 3-channel init: the gray plane is repeated to 3 channels", stacklevel=2)
    elif data_channels == 3 and channels == 1:
        warnings.warn(
            "colour data, 1-channel init: images are converted to gray (ITU-R 601 luma) and colour is lost; "
            "use a colour init (mednet_color) to keep it", stacklevel=2,
        )
    return channels, size



def training_device(cfg: FinetuneConfig) -> torch.device:
    """Where ``cfg`` trains: ``cfg.device``, else CUDA when available, else the CPU."""
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _build_model(cfg: FinetuneConfig, target: TargetSet) -> tuple[nn.Module, int, int, dict[str, Any]]:
    """Init -> contract check -> common head/BN preparation -> strategy: ``(model, C, size, info)``."""
    torch.manual_seed(cfg.seed)  # the new head's initialisation
    model, info = build_init(cfg.init, len(target.label_names), target.channels, cfg.arch)
    channels, size = check_input_contract(model, target.channels, cfg.image_size)
    info.update(prepare_for_transfer(model))
    info.update(apply_strategy(model, cfg.strategy, k=cfg.freeze_k, seed=cfg.seed))
    info.update(input_size=[channels, size, size], mean=list(model.pretrained_cfg.mean), std=list(model.pretrained_cfg.std))
    return model, channels, size, info


def run_contract(model: nn.Module, channels: int, size: int) -> Any:
    """The input contract of a run: the init's ``pretrained_cfg`` at the run's channels and size.

    It is what the fine-tuned model's card records (``save_pretrained(input_size=...)``), so
    ``EvalInputs(run_contract(...))`` here and ``EvalInputs(card)`` in ``openmednet predict`` are
    the same pipeline.
    """
    return model.pretrained_cfg.replace(input_size=(channels, size, size))



def _place_model(cfg: FinetuneConfig, model: nn.Module, info: dict[str, Any]) -> tuple[DistEnv, str, bool]:
    """Move ``model`` to the run's device; ``(dist, precision, channels_last)``, recorded in ``info``."""
    dist = DistEnv(device=training_device(cfg))
    precision, channels_last = resolve_precision(cfg.precision, dist.device, cfg.channels_last)
    info.update(precision=precision, channels_last=channels_last)
    model.to(dist.device)
    return dist, precision, channels_last


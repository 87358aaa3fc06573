"""MedNet inside timm (and so in segmentation_models_pytorch ``tu-`` encoders), and timm-style export.

After ``import openmednet``, timm knows ``mednet_gray``, ``mednet_color`` and ``mednet_test``::

    timm.create_model("mednet_gray", pretrained=True, features_only=True)   # shipped weights, offline
    segmentation_models_pytorch.Unet("tu-mednet_gray", encoder_weights=None, in_channels=1, classes=2)

Registering needs timm imported, which takes seconds, so ``import openmednet`` does not import
it: if timm is already imported the entrypoints are registered at once, otherwise an import hook
(``sys.meta_path``) registers them right after ``timm`` itself has been imported, whatever
imports it (``import timm``, segmentation_models_pytorch...). Nothing is read from disk for this.

The entrypoints translate timm's loading arguments and hand over to ``openmednet.create_model``:

- ``pretrained=True`` alone, or a tag (``"mednet_gray.<tag>"``): the registered weight set
  (shipped, checksum verified).
- ``pretrained_cfg_overlay=dict(file=PATH)``: a safetensors file, or a folder written by
  ``save_for_timm`` / ``save_pretrained`` (its model card supplies ``width_mult`` and the checksum).
- ``"local-dir:FOLDER"`` (timm's offline form of the Hugging Face layout) and ``"hf-hub:org/name"``:
  timm reads ``config.json`` (architecture, ``model_args``) and the weights come from that folder
  (or, for the hub, ``model_card.json`` + ``model.safetensors`` downloaded by huggingface_hub).
- ``features_only`` / ``out_indices`` / ``output_stride`` (what smp passes): ``_features.py``.

``save_for_timm(model, folder)`` writes ``model.safetensors`` + ``model_card.json``
(``save_pretrained``) + ``config.json`` (timm's ``save_for_hf`` format), so the folder loads with
``openmednet.load_pretrained``, with ``timm.create_model("local-dir:FOLDER", pretrained=True)`` and,
once uploaded, with ``"hf-hub:org/name"``.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from openmednet.models._card import CARD_FILE, WEIGHTS_FILE, read_model_card
from openmednet.models._factory import create_model
from openmednet.models._pretrained import PretrainedCfg
from openmednet.models._save import save_pretrained
from openmednet.models._weights import WeightsUnavailableError
from openmednet.models.mednet import variant_cfg
from openmednet.utils import atomic_write_text

__all__ = [
    "TIMM_CONFIG_FILE",
    "TIMM_MODELS",
    "install_timm_registration",
    "mednet_color",
    "mednet_gray",
    "mednet_test",
    "register_in_timm",
    "save_for_timm",
    "timm_pretrained_cfg",
]

TIMM_MODELS = ("mednet_gray", "mednet_color", "mednet_test")
TIMM_CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------------- entrypoints
def mednet_gray(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm entrypoint of Gray-MedNet (see the module docstring for the arguments)."""
    return _create_for_timm("mednet_gray", pretrained, **kwargs)


def mednet_color(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm entrypoint of Color-MedNet."""
    return _create_for_timm("mednet_color", pretrained, **kwargs)


def mednet_test(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm entrypoint of the tiny test MedNet (``width_mult=0.25``)."""
    return _create_for_timm("mednet_test", pretrained, **kwargs)


def _create_for_timm(
    arch: str,
    pretrained: bool,
    *,
    pretrained_cfg: str | Mapping[str, Any] | Any | None = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    pretrained_model_args: Mapping[str, Any] | None = None,
    feature_cls: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """timm's entrypoint call -> ``openmednet.create_model`` (weights resolved by ``_timm_weights``).

    ``pretrained_model_args`` (timm: the saved checkpoint's arguments) is already merged into
    ``kwargs`` by timm; the weights' own card or shapes decide any adaptation.
    """
    if feature_cls not in (None, "list"):
        raise ValueError(f"MedNet's features_only module returns a list; feature_cls={feature_cls!r} is not supported")
    name, pretrained_file = arch, None
    if pretrained:
        name, pretrained_file = _timm_weights(arch, pretrained_cfg, pretrained_cfg_overlay, cache_dir)
    return create_model(
        name, pretrained=pretrained and pretrained_file is None, pretrained_file=pretrained_file, **kwargs
    )


def _timm_weights(
    arch: str, cfg: Any, overlay: Mapping[str, Any] | None, cache_dir: str | Path | None
) -> tuple[str, str | None]:
    """Where timm's ``pretrained_cfg`` (+ overlay) says the weights are: ``(name, pretrained_file)``.

    Raises:
        ValueError: the cfg names a source MedNet cannot load from (a URL, an in-memory state dict).
        WeightsUnavailableError: hub weights that cannot be downloaded now.
    """
    if isinstance(cfg, str):  # a tag: "mednet_gray.<tag>"
        return (f"{arch}.{cfg}" if cfg else arch), (str(overlay["file"]) if overlay and overlay.get("file") else None)
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg or {})
    cfg.update(overlay or {})
    if cfg.get("source") == "local-dir":
        return arch, _with_card(Path(cfg["file"]))
    if cfg.get("source") == "hf-hub" or (cfg.get("hf_hub_id") and not cfg.get("file")):
        return arch, _from_hub(cfg["hf_hub_id"], cache_dir)
    if cfg.get("file"):
        return arch, _with_card(Path(cfg["file"]))
    if cfg.get("url") or cfg.get("state_dict") is not None:
        raise ValueError(
            f"{arch}: timm pretrained_cfg with a url or state_dict is not supported; pass "
            f"pretrained_cfg_overlay=dict(file=PATH) with a local safetensors file or save_for_timm folder"
        )
    return arch, None


def _with_card(path: Path) -> str:
    """``path``, or its folder when a ``model_card.json`` there describes it (checksum, model_args)."""
    folder = path if path.is_dir() else path.parent
    card = folder / CARD_FILE
    if card.is_file() and (path.is_dir() or read_model_card(card).weights_file == path.name):
        return str(folder)
    if path.is_dir():
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{folder} holds neither {CARD_FILE} nor {WEIGHTS_FILE}: not a save_for_timm folder")
        return str(weights)
    return str(path)


def _from_hub(hub_id: str, cache_dir: str | Path | None) -> str:
    """Download (or find cached) ``model_card.json`` + weights, else ``model.safetensors``, of ``hub_id``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    get = lambda filename: hf_hub_download(repo, filename, revision=revision or None, cache_dir=cache_dir)  # noqa: E731
    try:
        try:
            card_path = Path(get(CARD_FILE))
        except EntryNotFoundError:
            return get(WEIGHTS_FILE)
        get(read_model_card(card_path).weights_file)
        return str(card_path.parent)
    except OSError as e:  # offline, unreachable, or not in the cache
        raise WeightsUnavailableError(
            f"weights 'hf-hub:{hub_id}' could not be downloaded ({e}); on a machine without internet, "
            f"download the folder once and use timm.create_model('local-dir:FOLDER', pretrained=True)"
        ) from e


# --------------------------------------------------------------------------------- registration
def timm_pretrained_cfg(cfg: PretrainedCfg) -> dict[str, Any]:
    """MedNet's ``PretrainedCfg`` as timm's ``pretrained_cfg`` dict (``cfg.to_timm_dict()`` + the paper)."""
    return dict(
        cfg.to_timm_dict(),
        paper_ids="arXiv:2110.06512",
        paper_name="MedNet: Pre-trained Convolutional Neural Network Model for the Medical Imaging Tasks",
    )


def register_in_timm() -> list[str]:
    """Register the MedNet entrypoints in timm's registry (idempotent). Imports timm.

    The architecture's input contract becomes timm's default cfg, without weights: the weight
    sets are found by OpenMedNet's registry when a model is built (no file is read here).

    Returns:
        The names newly registered.
    """
    from timm.models import is_model, model_entrypoint, register_model

    module = sys.modules[__name__]
    added = []
    for name in TIMM_MODELS:
        fn = getattr(module, name)
        if is_model(name):
            if model_entrypoint(name) is fn:
                continue
            raise ValueError(f"timm already has a model named '{name}' ({model_entrypoint(name).__module__})")
        # timm's register_model reads the cfg of `name` from the entrypoint module's default_cfgs.
        module.default_cfgs = {**getattr(module, "default_cfgs", {}), name: timm_pretrained_cfg(variant_cfg(name))}
        register_model(fn)
        added.append(name)
    return added


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` right after module ``name`` is first imported (a post-import hook).

    ``find_spec`` asks the other finders for the real spec and wraps its loader; the wrapper puts
    the real loader back on the module before executing it (so the module looks exactly as if
    imported normally), executes it, then calls ``callback`` and removes this finder. A failing
    callback only warns: importing timm must not break because of OpenMedNet.
    """

    def __init__(self, name: str, callback: Callable[[], object]):
        self.name = name
        self.callback = callback
        self._searching = False

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != self.name or self._searching:
            return None
        self._searching = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._searching = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderThenCallback(spec.loader, self)
        return spec

    def done(self) -> None:
        """Called after the module executed: run the callback once and unhook."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            self.callback()
        except Exception as e:  # noqa: BLE001 - see class docstring
            warnings.warn(f"openmednet could not register its models in {self.name}: {e}", stacklevel=3)


class _LoaderThenCallback(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, hook: _RegisterAfterImport):
        self.loader = loader
        self.hook = hook

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.hook.done()


def install_timm_registration() -> None:
    """Register MedNet in timm now if timm is imported, else right after it is (see module docstring)."""
    if "timm" in sys.modules:
        register_in_timm()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport("timm", register_in_timm))


# --------------------------------------------------------------------------------- export
def save_for_timm(model: nn.Module, folder: str | Path, **card: Any) -> Path:
    """Write ``model`` as a timm / Hugging Face folder that OpenMedNet reads too.

    Files: ``model.safetensors`` and ``model_card.json`` (``save_pretrained``, with ``card`` as
    its provenance arguments) and ``config.json`` (timm's layout: ``architecture``,
    ``num_classes``, ``num_features``, ``model_args``, ``pretrained_cfg``).

    Args:
        model: a MedNet or a timm baseline built by ``openmednet.create_model``.
        folder: destination (created).
        **card: ``save_pretrained`` arguments (``data``, ``objective``, ``metrics``, ``label_names``...).

    Returns:
        The path of ``config.json``.

    Raises:
        ValueError: ``model`` is not a classifier built by ``create_model`` (e.g. a features module).
    """
    if not hasattr(model, "num_classes"):
        raise ValueError(
            f"save_for_timm saves classifiers (num_classes=0 for a backbone); got {type(model).__name__}: "
            f"export the model features_only was built from instead"
        )
    folder = Path(folder)
    saved = save_pretrained(model, folder, **card)
    cfg = read_model_card(folder).to_pretrained_cfg(source="file")
    timm_name = cfg.meta.get("timm_name")
    architecture = timm_name.split(".")[0] if timm_name else saved.architecture
    config = {
        "architecture": architecture,
        "num_classes": saved.num_classes,
        "num_features": int(getattr(model, "num_features", 0)),
        "global_pool": "avg",
        "model_args": {k: v for k, v in saved.model_args.items()},
        "pretrained_cfg": {**timm_pretrained_cfg(cfg), "label_names": list(saved.label_names)},
    }
    if saved.label_names:
        config["label_names"] = list(saved.label_names)
    path = folder / TIMM_CONFIG_FILE
    atomic_write_text(path, json.dumps(config, indent=2, default=list) + "\n")
    return path

"""Models: MedNet and the baselines it is compared with, behind one registry.

Importing this package only defines names: the shipped model cards are read at the first lookup
of weight sets (``_registry.defer_pretrained_cfgs``), and MedNet is registered in timm when timm
is (or has been) imported (``_timm.install_timm_registration``).
"""

from functools import partial

from openmednet.models import baselines  # noqa: F401  (registers the timm baselines)
from openmednet.models._builder import corpus_fingerprint_file, package_weights_dir
from openmednet.models._card import ModelCard, read_model_card
from openmednet.models._factory import create_model, load_pretrained
from openmednet.models._features import MedNetFeatures, to_features
from openmednet.models._init_spec import InitSpec
from openmednet.models._manipulate import adapt_input_conv
from openmednet.models._pretrained import PretrainedCfg
from openmednet.models._registry import (
    defer_pretrained_cfgs,
    get_pretrained_cfg,
    is_model,
    list_models,
    list_pretrained_cfgs,
    register_model,
)
from openmednet.models._save import record_corpus_fingerprint, save_pretrained
from openmednet.models._shipped import register_shipped_weights
from openmednet.models._timm import install_timm_registration, register_in_timm, save_for_timm
from openmednet.models._weights import WeightsUnavailableError, load_weights
from openmednet.models.mednet import MedNet

# Weights shipped in openmednet/assets/weights (or $OPENMEDNET_WEIGHTS_DIR), registered at the first
# lookup of weight sets; a broken card only warns.
defer_pretrained_cfgs(partial(register_shipped_weights, strict=False))
install_timm_registration()

__all__ = [
    "InitSpec",
    "MedNet",
    "MedNetFeatures",
    "ModelCard",
    "PretrainedCfg",
    "WeightsUnavailableError",
    "adapt_input_conv",
    "corpus_fingerprint_file",
    "create_model",
    "get_pretrained_cfg",
    "is_model",
    "list_models",
    "list_pretrained_cfgs",
    "load_pretrained",
    "load_weights",
    "package_weights_dir",
    "read_model_card",
    "record_corpus_fingerprint",
    "register_model",
    "register_in_timm",
    "register_shipped_weights",
    "save_for_timm",
    "save_pretrained",
    "to_features",
]

"""Models: MedNet and the baselines it is compared with, behind one registry."""

from openmednet.models import baselines  # noqa: F401  (registers the timm baselines)
from openmednet.models._builder import (
    corpus_fingerprint_file,
    load_pretrained,
    package_weights_dir,
)
from openmednet.models._pretrained import PretrainedCfg
from openmednet.models._registry import (
    create_model,
    get_pretrained_cfg,
    is_model,
    list_models,
    list_pretrained_cfgs,
    register_model,
)
from openmednet.models._shipped import register_shipped_weights
from openmednet.models._weights import (
    ModelCard,
    WeightsUnavailableError,
    adapt_input_conv,
    load_weights,
    read_model_card,
    record_corpus_fingerprint,
    save_pretrained,
)
from openmednet.models.mednet import MedNet

# Weights shipped in openmednet/assets/weights (or $OPENMEDNET_WEIGHTS_DIR); a broken card only warns.
register_shipped_weights(strict=False)

__all__ = [
    "MedNet",
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
    "register_shipped_weights",
    "save_pretrained",
]

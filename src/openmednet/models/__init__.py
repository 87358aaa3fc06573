"""Models: MedNet and the baselines it is compared with, behind one registry."""

from openmednet.models._pretrained import PretrainedCfg
from openmednet.models._registry import (
    create_model,
    get_pretrained_cfg,
    is_model,
    list_models,
    list_pretrained_cfgs,
    register_model,
)
from openmednet.models.mednet import MedNet

__all__ = [
    "MedNet",
    "PretrainedCfg",
    "create_model",
    "get_pretrained_cfg",
    "is_model",
    "list_models",
    "list_pretrained_cfgs",
    "register_model",
]

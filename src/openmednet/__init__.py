"""OpenMedNet: MedNet CNNs pre-trained on medical images, and the tools around them.

Quick use::

    import openmednet
    model = openmednet.create_model("mednet_gray", num_classes=3)
    openmednet.list_models("mednet_*")
"""

from openmednet.models import MedNet, PretrainedCfg, create_model, get_pretrained_cfg, list_models

__version__ = "0.1.0"

__all__ = ["MedNet", "PretrainedCfg", "create_model", "get_pretrained_cfg", "list_models", "__version__"]

"""OpenMedNet: MedNet CNNs pre-trained on medical images, and the tools around them.

Quick use::

    import openmednet
    model = openmednet.create_model("mednet_gray", pretrained=True, num_classes=3)
    openmednet.list_models("mednet_*", pretrained=True)
    openmednet.save_pretrained(model, "runs/my_model")
    model = openmednet.load_pretrained("runs/my_model")
"""

from openmednet.models import (
    MedNet,
    PretrainedCfg,
    WeightsUnavailableError,
    create_model,
    get_pretrained_cfg,
    list_models,
    load_pretrained,
    save_pretrained,
)

__version__ = "0.1.0"

__all__ = [
    "MedNet",
    "PretrainedCfg",
    "WeightsUnavailableError",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "load_pretrained",
    "save_pretrained",
    "__version__",
]

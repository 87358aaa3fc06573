"""Use a model: ``Predictor`` (files -> probabilities + Grad-CAM) and the web service.

The FastAPI app lives in ``openmednet.serve.app`` (``create_app``) and is imported only when
serving, so prediction does not pay for the web stack.
"""

from openmednet.serve.predictor import (
    ChannelConversionWarning,
    Prediction,
    Predictor,
    load_model,
)

__all__ = ["ChannelConversionWarning", "Prediction", "Predictor", "load_model"]

"""Self-supervised objectives as small parts (lightly's losses and heads); no training loops here.

The training loop lives in ``openmednet.engine``; views come from
``openmednet.data.transforms.build_multiview_transform``.
"""

from openmednet.ssl.objectives import SSL_METHODS, SimCLRObjective, build_ssl_objective

__all__ = ["SSL_METHODS", "SimCLRObjective", "build_ssl_objective"]

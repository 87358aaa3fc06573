"""Resuming a study: a finished arm (its ``metrics.json``) is reused only if it ran with the same configuration.

The rule itself (which fields can differ, how precision compares) is ``eval.finetune._resume``'s,
shared with a plain ``openmednet finetune`` re-run into a finished folder.
"""

from __future__ import annotations

from typing import Any

from openmednet.eval.finetune import FinetuneConfig
from openmednet.eval.finetune._resume import finished_metrics
from openmednet.eval.finetune._resume import result_config as _result_config

__all__ = ["_done", "_result_config"]


def _done(run: FinetuneConfig) -> dict[str, Any] | None:
    """The arm's metrics if it already finished with this exact configuration (``None`` if not
    finished; ``ValueError`` if it finished with another one)."""
    return finished_metrics(run)

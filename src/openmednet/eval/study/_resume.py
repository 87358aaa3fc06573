"""Resuming a study: a finished arm (its ``metrics.json``) is reused only if it ran with the same configuration."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from openmednet.config import to_dict
from openmednet.engine.precision import resolve_precision
from openmednet.eval.finetune import FinetuneConfig, training_device
from openmednet.eval.semi import semi_neutral

#: Run fields that do not change a run's result: a finished arm is reused whatever they are.
_RESULT_NEUTRAL = ("out", "device", "num_workers")


def _done(run: FinetuneConfig) -> dict[str, Any] | None:
    """The arm's metrics if it already finished with this exact configuration."""
    path = run.out / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    ran_with = _ran_with(metrics)
    will_run = resolve_precision(run.precision, training_device(run), run.channels_last)
    if _result_config(metrics.get("config") or {}, ran_with) != _result_config(to_dict(run), will_run):
        raise ValueError(
            f"{run.out} holds a finished run with a different configuration: use a new study 'out' "
            f"directory, or delete that run to redo it"
        )
    return metrics


def _result_config(config: Mapping[str, Any], precision: tuple[str, bool]) -> dict[str, Any]:
    # A moved study directory or a run on another device or with more loader workers (the batches
    # do not depend on them) is the same run. Precision compares by what ran: "auto" that resolved
    # to bf16 is the same run as an explicit bf16 (and an AVX2 machine does not reuse bf16 arms for
    # an "auto" that means fp32 there).
    # A field added to FinetuneConfig after an arm ran compares as its default (the behaviour
    # that arm had), so a code update does not invalidate finished arms.
    config = {**_FIELDS_ADDED_LATER, **config}
    out = semi_neutral({k: v for k, v in config.items() if k not in _RESULT_NEUTRAL})  # runs made before `semi`
    out["precision"], out["channels_last"] = precision
    return out


#: FinetuneConfig fields that older finished arms lack, with the value that reproduces their behaviour.
_FIELDS_ADDED_LATER = {"task": "classification", "min_epochs": 0}


def _ran_with(metrics: Mapping[str, Any]) -> tuple[str, bool]:
    """``(precision, channels_last)`` a finished arm trained with (runs before ``auto`` recorded
    only their config, which was then explicit)."""
    model, config = metrics.get("model") or {}, metrics.get("config") or {}
    if "precision" in model:
        return model["precision"], bool(model["channels_last"])
    precision = config.get("precision", "fp32")
    channels_last = config.get("channels_last")
    return precision, (precision == "bf16") if channels_last is None else bool(channels_last)

"""Is the finished run in a folder the run about to start? One rule for ``openmednet finetune`` and studies.

A run folder is finished when it holds ``metrics.json`` (written last, with the resolved
configuration). Two configurations are the same run when they differ only in fields that cannot
change the result (``RESULT_NEUTRAL``) and trained in the same precision and memory layout. A study
reuses such a run instead of training it again (``eval.study``); ``start_run`` refuses to overwrite a
finished run of a *different* configuration, so a re-run with changed settings cannot destroy the
results already written (the fix: a new ``--out``, or delete the folder).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from openmednet.config import changed_fields, dotted, to_dict
from openmednet.engine.precision import resolve_precision
from openmednet.eval.finetune._model import training_device
from openmednet.eval.semi import semi_neutral

__all__ = ["RESULT_NEUTRAL", "config_changes", "finished_metrics", "ran_with", "result_config"]

#: Run fields that do not change a run's result: a finished run is the same run whatever they are.
RESULT_NEUTRAL = ("out", "device", "num_workers")

#: FinetuneConfig fields that older finished runs lack, with the value that reproduces their behaviour.
_FIELDS_ADDED_LATER = {"task": "classification", "min_epochs": 0}


def result_config(config: Mapping[str, Any], precision: tuple[str, bool]) -> dict[str, Any]:
    """The fields of a run configuration that decide its result, with the precision it trains in.

    A moved folder, or a run on another device or with more loader workers (the batches do not
    depend on them), is the same run. Precision compares by what ran: ``auto`` that resolved to bf16
    is the same run as an explicit bf16 (and an AVX2 machine does not reuse bf16 runs for an
    ``auto`` that means fp32 there). A field added to ``FinetuneConfig`` after a run finished
    compares as its default (the behaviour that run had), so a code update does not invalidate it.
    """
    config = {**_FIELDS_ADDED_LATER, **config}
    out = semi_neutral({k: v for k, v in config.items() if k not in RESULT_NEUTRAL})  # runs made before `semi`
    out["precision"], out["channels_last"] = precision
    return out


def ran_with(metrics: Mapping[str, Any]) -> tuple[str, bool]:
    """``(precision, channels_last)`` a finished run trained with (runs before ``auto`` recorded
    only their config, which was then explicit)."""
    model, config = metrics.get("model") or {}, metrics.get("config") or {}
    if "precision" in model:
        return model["precision"], bool(model["channels_last"])
    precision = config.get("precision", "fp32")
    channels_last = config.get("channels_last")
    return precision, (precision == "bf16") if channels_last is None else bool(channels_last)


def config_changes(metrics: Mapping[str, Any], run: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """Fields in which ``run`` differs from the finished run whose ``metrics.json`` is ``metrics``.

    Args:
        metrics: the finished run's ``metrics.json`` content.
        run: the ``FinetuneConfig`` about to run.
        ignore: further fields to leave out of the comparison (e.g. ``rounds``: a longer
            pseudo-labelling run continues a shorter one in its folder).

    Returns:
        Sorted field names (``precision``/``channels_last`` for what training resolved to); empty
        when it is the same run.
    """
    return changed_fields(*_compared(metrics, run), ignore=ignore)


def _compared(metrics: Mapping[str, Any], run: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The finished run's and ``run``'s configurations as ``config_changes`` compares them."""
    will_run = resolve_precision(run.precision, training_device(run), run.channels_last)
    return result_config(metrics.get("config") or {}, ran_with(metrics)), result_config(to_dict(run), will_run)


def describe_changes(metrics: Mapping[str, Any], run: Any, changed: list[str]) -> str:
    """``changed`` as ``field: before -> now``. When ``semi`` changed, the settings only one of the two
    methods reads are left out (the method change is the difference; listing them named settings the
    user never touched)."""
    before, now = (dotted(c) for c in _compared(metrics, run))
    if "semi" in changed:
        changed = [k for k in changed if k in before and k in now or k == "semi"]
    # semi_neutral leaves "semi" out of a run without one: it is "none" there.
    unset = lambda k: "none" if k == "semi" else "not set"  # noqa: E731
    short = lambda v: (s if len(s := repr(v)) <= 60 else s[:57] + "...")  # noqa: E731
    return ", ".join(f"{k}: {short(before.get(k, unset(k)))} -> {short(now.get(k, unset(k)))}" for k in changed)


def finished_metrics(run: Any, *, ignore: tuple[str, ...] = (),
                     fix: str = "use a new study 'out' directory, or delete that run to redo it") -> dict[str, Any] | None:
    """The metrics of the finished run in ``run.out`` if it is this run, ``None`` if none finished there.

    Args:
        run: the ``FinetuneConfig`` about to run.
        ignore: fields that may differ (see :func:`config_changes`).
        fix: what the error tells the user to do.

    Raises:
        ValueError: ``run.out`` holds a finished run of another configuration (the fields named).
    """
    path = run.out / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    changed = config_changes(metrics, run, ignore)
    if changed:
        raise ValueError(f"{run.out} holds a finished run with a different configuration ("
                         f"{describe_changes(metrics, run, changed)}); {fix}")
    return metrics

"""Deferred weight registration (``models._registry``): a concurrent first lookup waits for the
registrations in progress, and a registration that fails is retried at the next lookup."""

from __future__ import annotations

import threading
import time

import pytest

from openmednet.models import _registry


def test_a_concurrent_first_lookup_waits_for_a_running_registration():
    _registry._run_deferred()  # the shipped cards, registered once
    started, done = threading.Event(), []

    def slow_registration() -> None:
        started.set()
        time.sleep(0.3)
        done.append(True)

    _registry.defer_pretrained_cfgs(slow_registration)
    first = threading.Thread(target=_registry._run_deferred)
    first.start()
    assert started.wait(10)
    _registry._run_deferred()  # the second lookup, while the first runs the registration
    assert done == [True]  # it returned only after the registration completed
    first.join()


def test_a_failing_registration_is_retried_at_the_next_lookup():
    _registry._run_deferred()
    calls = []

    def flaky_registration() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("weights folder not readable yet")

    _registry.defer_pretrained_cfgs(flaky_registration)
    with pytest.raises(OSError, match="not readable yet"):
        _registry._run_deferred()
    _registry._run_deferred()
    assert len(calls) == 2 and not _registry._deferred

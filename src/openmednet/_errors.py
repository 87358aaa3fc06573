"""Helpers for errors that say what was got, what was expected and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return a ``"; did you mean 'x'?"`` suffix for the closest choice, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def look_up_option(name: str, choices: Iterable[str], what: str = "option") -> str:
    """Return ``name`` if it is one of ``choices``, else raise ``KeyError`` with a suggestion.

    Modelled on MONAI's ``look_up_option``: the message lists the valid values.
    """
    choices = list(choices)
    if name in choices:
        return name
    raise KeyError(
        f"unknown {what} '{name}'{did_you_mean(name, choices)} (valid: {', '.join(sorted(choices))})"
    )

"""Corpus report plots are drawn on their own Agg canvas and leave the global backend alone."""

from __future__ import annotations

import matplotlib

from openmednet.data.report import _bar_plot, _size_plot


def test_report_plots_leave_the_global_backend_alone():
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's choice, which used to be switched to Agg
    try:
        pngs = [
            _bar_plot({"knee_oa": 8260, "brain_tumor_mri": 5751}, "Per source"),
            _size_plot([0, 64, 128], {"knee_oa": [0, 10, 5]}),
        ]
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"

"""engine.jobs: jobs run here in order, or n at a time in spawned workers with the threads divided."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from openmednet.engine.jobs import run_jobs, threads_per_job


def _square(x: int) -> tuple[int, int, int]:
    """A job: its result, and the threads and process it ran with (pickled by name into workers)."""
    if x < 0:
        raise ValueError(f"job {x} refused")
    return x * x, torch.get_num_threads(), os.getpid()


def _sleep(pid_file: str) -> None:
    """A job that would outlive the test: it records its process and sleeps."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)


def _running(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # the parent's threads, to be divided; it only waits while workers run
    yield
    torch.set_num_threads(before)


def test_threads_are_divided_between_jobs_at_least_one_each() -> None:
    assert [threads_per_job(n, total=8) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        threads_per_job(0)


def test_one_job_at_a_time_runs_here_in_order(four_threads) -> None:
    assert run_jobs(_square, iter([3, 1, 2]), 1) == [(9, 4, os.getpid()), (1, 4, os.getpid()), (4, 4, os.getpid())]


def test_a_pool_returns_results_in_job_order_from_workers_with_half_the_threads(four_threads) -> None:
    results = run_jobs(_square, iter([3, 1, 2, 5, 4]), 2)
    assert [r[0] for r in results] == [9, 1, 4, 25, 16]
    assert {r[1] for r in results} == {2}
    pids = {r[2] for r in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_a_job_exception_reaches_the_caller_from_a_pool() -> None:
    with pytest.raises(ValueError, match="job -1 refused"):
        run_jobs(_square, [1, -1, 2, 3], 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    # Regression: a parent killed outright (a timeout's SIGKILL) left its workers training on.
    pid_file = tmp_path / "worker.pid"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_jobs import _sleep; "
            f"from openmednet.engine.jobs import run_jobs; run_jobs(_sleep, [{str(pid_file)!r}], 2)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert _wait_for(pid_file.is_file, 240), "the worker did not start"
        worker = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_for(lambda: not _running(worker), 30), "the worker outlived its parent"
    finally:
        parent.kill()

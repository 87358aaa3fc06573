"""Worker processes for decoding: they die with the build, and a crashing decoder costs one item.

Every decode of untrusted files with more than one worker (the channel census, the sources, the
exclusion targets) runs through ``run_isolated``. Decoders are C code (libjpeg, OpenJPEG, GDCM,
...): a hostile file can segfault its process or exhaust its memory. The pool notices the dead
worker, and the tasks that were in flight are re-run item by item, each in a fresh process, so
only the culprit item is lost.

Workers must end with the build even when it is killed with SIGKILL: a killed build never shuts
its pool down, and a forked worker blocked on the task queue never sees EOF (it holds the queue's
write end itself), so it would decode on, or wait, forever. ``die_with_build`` arms that.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

K = TypeVar("K")
R = TypeVar("R")
Items = list[dict[str, Any]]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: Seconds between liveness checks of the build where no pidfd can be waited on.
_POLL_SECONDS = 1.0


def run_isolated(
    tasks: Iterator[tuple[K, Items]],
    work: Callable[..., R],
    args: tuple,
    workers: int,
    done: Callable[[K, R], Any],
    join: Callable[[Items, list[R | None]], R],
) -> None:
    """Run ``work(items, *args)`` for every ``(key, items)`` task and hand each result to
    ``done(key, result)`` in this process (in completion order).

    With ``workers <= 1`` everything runs in this process. Otherwise a pool of ``workers``
    processes (``worker_pool``) runs the tasks, at most 2 per worker in flight so that finished
    results never pile up in RAM. When a worker dies, each task that was in flight is re-run item
    by item, each item in a fresh process, and ``join(items, results)`` assembles the task's
    result from the one-item results (``None`` for an item that killed its process).

    Args:
        tasks: ``(key, items)`` pairs, consumed lazily.
        work: a module-level function (pickled by name); ``work(items, *args)`` must not raise
            for a bad item (report it in its result instead).
        args: the further arguments of ``work`` (picklable).
        workers: number of processes (1 = this process).
        done: called with each task's key and result.
        join: builds a task's result from its items' results after a worker died.
    """
    if workers <= 1:
        for key, items in tasks:
            done(key, work(items, *args))
        return
    while True:
        suspects = _pool_pass(tasks, work, args, workers, done)
        if not suspects:
            return
        # A worker died (a decoder crashed or ran out of memory): re-run the tasks that were in
        # flight item by item, each in its own process, so only the culprit is lost.
        for key, items in suspects:
            done(key, join(items, [_run_alone(work, [d], args) for d in items]))


def _pool_pass(
    tasks: Iterator[tuple[K, Items]], work: Callable[..., R], args: tuple, workers: int, done: Callable[[K, R], Any]
) -> list[tuple[K, Items]]:
    """Run tasks in a process pool until all are done (returns ``[]``) or until a worker dies
    (returns the tasks that were in flight; ``tasks`` keeps the rest)."""
    pending: dict[Future, tuple[K, Items]] = {}
    with worker_pool(workers) as pool:
        while True:
            while len(pending) < 2 * workers:
                nxt = next(tasks, None)
                if nxt is None:
                    break
                pending[pool.submit(work, nxt[1], *args)] = nxt
            if not pending:
                return []
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    logger.warning("a decoding process died; isolating the %d tasks in flight", len(pending))
                    return list(pending.values())
                done(pending.pop(fut)[0], result)


def _run_alone(work: Callable[..., R], items: Items, args: tuple) -> R | None:
    """``work(items, *args)`` in a fresh process; ``None`` if it killed that process."""
    with worker_pool(1) as pool:
        try:
            return pool.submit(work, items, *args).result()
        except BrokenProcessPool:
            return None


def worker_pool(workers: int, mp_context: BaseContext | None = None) -> ProcessPoolExecutor:
    """A pool whose workers die with this process, even when it is killed with SIGKILL.

    Args:
        workers: number of worker processes.
        mp_context: the multiprocessing start method's context (default: Python's default,
            ``fork`` on Linux up to Python 3.13, ``forkserver`` from 3.14, ``spawn`` on macOS).
    """
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=mp_context, initializer=die_with_build, initargs=(os.getpid(),)
    )


def die_with_build(build_pid: int) -> None:
    """Worker initializer: exit when the build process ``build_pid`` ends.

    The build is not always the worker's parent: under ``fork`` and ``spawn`` it is, under
    ``forkserver`` the parent is the fork server. So the build's pid is passed in explicitly and
    never inferred from ``os.getppid()``.

    - Parent is the build, on Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, the kernel kills the
      worker when the build dies. Its limits: Linux only; it fires when the *thread* that
      started the worker ends, not the process (the pools here are created and used by the
      build's calling thread, which outlives them); it would watch the wrong process when the
      parent is a fork server.
    - Otherwise: a daemon thread waits for the build to end, on a pidfd (Linux >= 5.3; immune
      to pid reuse) or, without one, by polling once a second (the parent id changes when the
      parent is the build; else ``kill(build_pid, 0)``, which cannot see a build that died but
      was not reaped yet).
    """
    parent_is_build = os.getppid() == build_pid
    if parent_is_build and _set_parent_death_signal():
        if os.getppid() != build_pid:  # the build died before the signal was armed
            os._exit(1)
        return
    try:
        pidfd = os.pidfd_open(build_pid)
    except ProcessLookupError:  # the build is gone already
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here: poll
        pidfd = None
    if pidfd is None and _build_ended(build_pid, parent_is_build):
        os._exit(1)
    threading.Thread(
        target=_exit_when_build_ends, args=(build_pid, parent_is_build, pidfd), daemon=True, name="build-watch"
    ).start()


def _set_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exit_when_build_ends(build_pid: int, parent_is_build: bool, pidfd: int | None) -> None:
    if pidfd is not None:
        poll = select.poll()
        poll.register(pidfd, select.POLLIN)
        poll.poll()  # a pidfd turns readable when its process has exited
    else:
        while not _build_ended(build_pid, parent_is_build):
            time.sleep(_POLL_SECONDS)
    os._exit(1)


def _build_ended(build_pid: int, parent_is_build: bool) -> bool:
    if parent_is_build:
        return os.getppid() != build_pid  # an orphan is re-parented at once, even before reaping
    try:
        os.kill(build_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # the pid now belongs to another user's process: the build is gone
        return True
    return False

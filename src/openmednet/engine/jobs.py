"""Run independent jobs one after another, or ``n_jobs`` at a time in worker processes.

Why it exists: a transfer study (and the quick start, which is one study) is a grid of arms that
share nothing but their inputs on disk, and a small CPU model does not keep all cores busy (data
loading, the optimizer step and the evaluation are partly serial). Running two arms at once, each
on half the threads, finishes a grid sooner than one arm on all threads. This module is the one
place that knows how; ``openmednet.eval.study.run_study`` (``openmednet study --jobs N``,
``openmednet quickstart --jobs N``) is its user.

- ``n_jobs == 1``: every job runs in this process, in order (no pool, no pickling).
- ``n_jobs > 1``: a ``ProcessPoolExecutor`` of up to ``n_jobs`` workers (started on demand) with
  the ``spawn`` start method (forking a process whose torch thread pools already exist can
  deadlock, and spawn is the one start method of every platform). The workers are not daemons, so
  a job may start its own DataLoader workers. Each worker sets
  ``torch.set_num_threads(threads_per_job(n_jobs))``: the parent's ``torch.get_num_threads()`` (which
  follows ``OMP_NUM_THREADS``) divided between the workers, at least 1, so ``--jobs 2`` on 8
  threads runs two jobs of 4 threads. Jobs are consumed lazily (a job is drawn from the iterable
  only when a worker is free), so a caller can prepare later jobs, e.g. decode the next target,
  while earlier ones train.
- Results come back in job order, whatever order the jobs finish in; one log line per finished job
  gives its wall time. A job's exception is re-raised here after the jobs still queued are
  cancelled (running ones finish): callers that want one failure not to stop the others catch it
  inside ``fn`` and return it as a result, as the study does.

A script that calls this with ``n_jobs > 1`` must guard its entry point
(``if __name__ == "__main__":``), as every ``spawn`` user must; ``fn`` and the jobs are pickled,
so ``fn`` is a module-level function and a job should carry paths and settings, not decoded data.

Identical results: the pool changes where a job runs, not what it computes, when each job seeds
itself (``run_finetune`` does, from its config). Floating-point results still depend on the number
of intra-op threads a job gets (CPU kernels split their sums by thread: one epoch of a 64 px
``scratch:mednet_gray`` arm on the demo sample gave test AUROC 0.70244 on 1 thread, 0.70258 on 2).
So ``--jobs N`` matches a sequential run bit for bit when both give a job the same thread count:
``OMP_NUM_THREADS=1`` with and without ``--jobs 2`` (each arm on 1 thread; ``--jobs 2`` then uses
2 cores), or ``OMP_NUM_THREADS=1`` sequentially vs ``OMP_NUM_THREADS=2 --jobs 2``.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

import torch

__all__ = ["run_jobs", "threads_per_job"]

logger = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")


def threads_per_job(n_jobs: int, total: int | None = None) -> int:
    """Intra-op threads of each of ``n_jobs`` concurrent jobs: ``max(1, total // n_jobs)``.

    Args:
        n_jobs: jobs running at once (>= 1).
        total: threads to divide; ``None`` = ``torch.get_num_threads()`` (``OMP_NUM_THREADS``).
    """
    if n_jobs < 1:
        raise ValueError(f"jobs must be >= 1 (1 runs the jobs one after another), got {n_jobs}")
    return max(1, (torch.get_num_threads() if total is None else total) // n_jobs)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    # A parent killed outright (SIGKILL, a timeout) cannot stop its workers; without this each
    # would finish its job for nobody. A job writes its completion marker last, so none is left
    # looking finished.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
    # Workers keep warnings and errors; per-epoch INFO lines of concurrent jobs would interleave,
    # so progress is the parent's one line per finished job.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s [job worker %(process)d] %(name)s: %(message)s")


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # ready when the parent process has ended
    os._exit(1)


def _timed(fn: Callable[[J], R], job: J) -> tuple[R, float]:
    start = time.perf_counter()
    return fn(job), time.perf_counter() - start


def run_jobs(fn: Callable[[J], R], jobs: Iterable[J], n_jobs: int = 1, *,
             describe: Callable[[J], str] = str) -> list[R]:
    """``[fn(job) for job in jobs]``, with up to ``n_jobs`` jobs at once (see the module docstring).

    Args:
        fn: a module-level function (it is pickled by name when ``n_jobs > 1``).
        jobs: picklable jobs; drawn lazily, one when a worker is free.
        n_jobs: jobs running at once; 1 runs them here, in order.
        describe: the job's name in the "finished" log line.

    Returns:
        ``fn``'s results in the order of ``jobs``.

    Raises:
        ValueError: ``n_jobs < 1``.
        Exception: the first exception a job raised (queued jobs are cancelled).
    """
    threads = threads_per_job(n_jobs)
    if n_jobs == 1:
        results = []
        for job in jobs:
            result, seconds = _timed(fn, job)
            results.append(result)
            logger.info("finished in %.1f s (%d thread(s)): %s", seconds, threads, describe(job))
        return results
    return _run_pool(fn, iter(jobs), n_jobs, threads, describe)


def _run_pool(fn, jobs, n_jobs: int, threads: int, describe) -> list[Any]:
    results: dict[int, Any] = {}
    running: dict[Future, tuple[int, Any]] = {}
    ctx = multiprocessing.get_context("spawn")
    # Workers start on demand, one per submitted job up to n_jobs.
    with ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:

        def submit(k: int) -> None:
            for job in itertools.islice(jobs, k):
                running[pool.submit(_timed, fn, job)] = (len(results) + len(running), job)

        try:
            submit(n_jobs)
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    i, job = running.pop(future)
                    results[i], seconds = future.result()  # a job's exception propagates here
                    logger.info("finished in %.1f s (%d thread(s)): %s", seconds, threads, describe(job))
                submit(len(done))  # draw the next jobs only now: the iterable may prepare them lazily
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [results[i] for i in range(len(results))]

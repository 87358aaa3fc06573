"""Shared helpers for the benchmark scripts: a matmul reference, a robust timer, markdown tables.

Our machines are shared (2 cores, several engineers), so absolute times drift with the load.
Benchmarks therefore report *ratios* against a reference measured in the same run, ideally right
next to the measurement (``MatmulReference.measure`` is cheap enough to call before every row).

Example::

    from _common import MatmulReference, time_fn, time_paired, markdown_table

    ref = MatmulReference(dtype=torch.bfloat16)
    t = time_fn(lambda: model(x), warmup=1, iters=5)        # Timing(times=...), .median, .best
    t, rates = time_paired(lambda: model(x), ref)            # + the matmul rate after each call
    frac = statistics.median(flops / s / r for s, r in zip(t.times, rates))
    print(markdown_table(["model", "fraction"], [["mednet", f"{frac:.2f}"]]))
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated calls, in seconds.

    Attributes:
        times: every timed call (warm-up calls excluded).
    """

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median time per call; robust to a few calls slowed by other processes."""
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        """Fastest call: the closest to the unloaded machine."""
        return min(self.times)


def time_fn(fn: Callable[[], object], *, warmup: int = 1, iters: int = 5) -> Timing:
    """Time ``fn()`` ``iters`` times after ``warmup`` untimed calls.

    Warm-up calls absorb one-off costs (oneDNN primitive creation, allocator growth, lazy init).

    Args:
        fn: the work to time; its result is discarded.
        warmup: untimed calls first (>= 0).
        iters: timed calls (>= 1).

    Returns:
        A ``Timing`` with one entry per timed call.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


@dataclass
class MatmulReference:
    """The achieved FLOP/s of a square matmul: the machine's practical peak for ``dtype``.

    On CPUs with AMX (``amx_bf16``) a bf16 matmul runs on the tile unit, which is also what
    oneDNN uses for bf16 convolutions, so "fraction of a bf16 matmul" says how close a network
    gets to the best the machine can do. Each ``measure()`` call is recorded, so a benchmark
    can quote the reference next to every row and the run's median at the end.

    Args:
        dtype: matmul dtype (``torch.bfloat16`` by default).
        n: matrix size; ``2 n^3`` FLOPs per product (2048: ~17 GFLOP, ~15 ms with AMX on 1 core).
        iters: timed products per ``measure()``.
    """

    dtype: torch.dtype = torch.bfloat16
    n: int = 2048
    iters: int = 5
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self._a = torch.randn(self.n, self.n, generator=gen).to(self.dtype)
        self._b = torch.randn(self.n, self.n, generator=gen).to(self.dtype)

    def measure(self, iters: int | None = None) -> float:
        """Measure now; returns FLOP/s (median of ``iters`` products, default ``self.iters``) and records it."""
        timing = time_fn(lambda: torch.mm(self._a, self._b), warmup=1, iters=iters or self.iters)
        rate = 2 * self.n**3 / timing.median
        self.history.append(rate)
        return rate

    @property
    def median(self) -> float:
        """Median over every ``measure()`` so far (measures once if there is none yet)."""
        if not self.history:
            self.measure()
        return statistics.median(self.history)


def time_paired(
    fn: Callable[[], object], reference: MatmulReference, *, warmup: int = 1, iters: int = 5, ref_iters: int = 3
) -> tuple[Timing, tuple[float, ...]]:
    """Time ``fn()`` and measure ``reference`` right after each call, as pairs.

    On a shared machine the load changes from second to second; pairing each timed call with a
    reference measured a few milliseconds later lets ``work / time / reference_rate`` be computed
    per pair, so a slow-down that hits both cancels out.

    Returns:
        The ``Timing`` of ``fn`` and the reference FLOP/s measured after each timed call.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times, rates = [], []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        rates.append(reference.measure(iters=ref_iters))
    return Timing(tuple(times)), tuple(rates)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls/convolutions run by ``fn()`` (``torch.utils.flop_counter``; 1 MAC = 2 FLOPs).

    Element-wise work (BatchNorm, ReLU, pooling, the optimizer) is not counted, as in the usual
    "GFLOPs" of model papers.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table.

    Args:
        headers: column titles.
        rows: cells (converted with ``str``); every row must have ``len(headers)`` cells.
        align: one character per column, ``l`` or ``r`` (default: first column left, others right).

    Raises:
        ValueError: a row has the wrong number of cells, or ``align`` has the wrong length.
    """
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} characters for {len(headers)} columns")
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, expected {len(headers)}: {row}")
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = [headers, rule, *[[str(c) for c in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def cpu_flags() -> set[str]:
    """CPU feature flags from ``/proc/cpuinfo`` (empty set where unavailable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def environment() -> str:
    """One line describing the run: torch, CPU, threads, relevant ISA flags, load average."""
    flags = sorted(f for f in cpu_flags() if f.startswith(("amx", "avx512_bf16", "avx512f")))
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} thread(s), flags {' '.join(flags) or 'none'}, "
        f"load average {load}"
    )

"""Training precision chosen by the hardware: ``auto`` is bf16 + channels_last where bf16 is native.

bf16 autocast pays only where the hardware has bf16 arithmetic. On a CPU with AVX512-BF16 or AMX,
oneDNN's bf16 kernels made MedNet fine-tuning 1.6x faster than fp32 and pre-training 1.4-2.2x
(docs/benchmarks.md). On a CPU without them (AVX2 only), the same kernels are emulated with
conversions around fp32 arithmetic: a MedNet training step ran about 9x slower than fp32 in our
runs ("Fine-tuning precision" in docs/benchmarks.md). So the default is ``auto``, resolved here, in
one place, for every loop that trains (``engine.trainer``, ``eval.finetune``, ``engine.pretrain``):

========== ==================================================================================
``auto``   ``bf16`` + ``channels_last`` where bf16 is native (CPU: AVX512-BF16 or AMX on x86,
           the BF16 extension on Arm; CUDA: compute capability >= 8.0), else ``fp32``
``bf16``   bf16 autocast; on a CPU without native bf16 it works but warns once with the cost
``fp16``   fp16 autocast with a ``GradScaler``; CUDA only
``fp32``   no autocast
========== ==================================================================================

Evaluation is not affected: validation and test always run in fp32.
"""

from __future__ import annotations

import functools
import platform
import warnings

import torch

from openmednet._errors import look_up_option

__all__ = ["PRECISIONS", "SlowPrecisionWarning", "bf16_support", "cpu_capability", "resolve_precision"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

#: Measured cost of emulated bf16 (docs/benchmarks.md, "Fine-tuning precision"): a MedNet training
#: step against fp32 on an AVX2-only CPU.
EMULATED_BF16_SLOWDOWN = 9


class SlowPrecisionWarning(UserWarning):
    """The requested precision runs without hardware support, much slower than fp32."""


def cpu_capability() -> str:
    """What torch reports for this CPU's vector ISA (``"AVX2"``, ``"AVX512"``, ``"SVE256"``...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # very old or exotic builds: the probe is advisory, never fatal
        return "unknown"


def _cpu_bf16_native() -> bool:
    """Whether this CPU executes bf16 arithmetic natively (not emulated around fp32).

    ``torch.backends.cpu.get_cpu_capability()`` says ``"AVX512"`` with or without the BF16
    extension, and ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is true on any AVX512 x86 CPU
    (oneDNN can emulate there). The x86 answer therefore comes from the instruction-set probes
    torch exposes in ``torch.cpu``; on Arm, oneDNN's check is the BF16 extension itself.
    """
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_support(device: torch.device | str) -> tuple[bool, str]:
    """``(native, description)`` of bf16 on ``device``; the one capability probe (tests patch it).

    Args:
        device: ``cpu`` or ``cuda[:i]``.

    Returns:
        Whether bf16 runs natively, and what was found, for messages (``"CPU AVX2, no
        AVX512-BF16/AMX"``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return native, f"CUDA {'with' if native else 'without'} native bf16"
    if device.type != "cpu":
        return False, f"device type {device.type!r}"
    native = _cpu_bf16_native()
    return native, f"CPU {cpu_capability()}, {'with' if native else 'no'} AVX512-BF16/AMX"


@functools.cache
def _warn_emulated_bf16(description: str) -> None:
    # Cached: once per process and hardware, however many runs and epochs ask for bf16.
    warnings.warn(
        f"precision 'bf16' on a device without native bf16 ({description}): it is emulated, and a MedNet "
        f"training step ran about {EMULATED_BF16_SLOWDOWN}x slower than fp32 on an AVX2-only CPU "
        "(docs/benchmarks.md, 'Fine-tuning precision'); use precision 'auto' (fp32 here) or 'fp32'",
        SlowPrecisionWarning, stacklevel=3,
    )


def resolve_precision(precision: str, device: torch.device | str, channels_last: bool | None = None) -> tuple[str, bool]:
    """The concrete precision and memory layout a training loop runs with.

    Args:
        precision: one of ``PRECISIONS``.
        device: where training runs.
        channels_last: NHWC inputs and weights; ``None`` follows the precision (on with bf16, where
            oneDNN's and cuDNN's bf16 convolutions want NHWC; off otherwise).

    Returns:
        ``(precision, channels_last)`` with ``precision`` in ``bf16``, ``fp16``, ``fp32``.

    Raises:
        KeyError: unknown precision (with the closest valid one).
        ValueError: ``fp16`` on a device other than CUDA.

    Warns:
        SlowPrecisionWarning: ``bf16`` asked for explicitly on a device without native bf16 (once).
    """
    look_up_option(precision, PRECISIONS, "precision")
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; on CPU use 'auto', 'bf16' or 'fp32'")
    if precision in ("auto", "bf16"):
        native, description = bf16_support(device)
        if precision == "auto":
            precision = "bf16" if native else "fp32"
        elif not native:
            _warn_emulated_bf16(description)
    return precision, (precision == "bf16") if channels_last is None else bool(channels_last)

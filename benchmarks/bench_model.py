"""Model benchmark: MedNet vs timm ResNet-18/50 -- parameters, FLOPs, training and inference speed.

For each input size (64, 224 px), precision mode and phase it measures images/s and the achieved
FLOP/s of every model *in the same run*, and divides the latter by a matmul in the machine's fastest native dtype (bf16 where the CPU runs it natively, else fp32) measured right
after each timed step (``_common.time_paired``). That fraction is comparable across
models and more robust to the load of a shared machine than absolute images/s.

Modes:
    fp32      float32, NCHW (PyTorch's default).
    bf16cl    ``torch.autocast("cpu", bfloat16)`` and ``channels_last`` model and input (oneDNN
              then uses AVX512-BF16 / AMX kernels where the CPU has them).
    fp32cl    float32, channels_last: what pre-training runs in on a CPU without native bf16
              (``channels_last: true`` is its default); separates the layout effect from the dtype.

Variants (MedNet only): ``+fused`` is ``MedNet.fuse_for_inference()`` (BatchNorm folded; inference
rows), ``+compile`` is ``torch.compile`` (``--compile``; compile time is reported separately), and
``--ablate`` times the training step with each block's four branch convs separate (as shipped) and
merged in the ``--merge-stages`` (``MedNet.set_branch_merge``) in each ``--merge-groups`` grouping
(``all``: one zero-padded 7x7 conv; ``paired``: the 1x1 in a 3x3 conv, the 5x5 in a 7x7 conv), next
to ResNet-18, in interleaved rounds. Its default mode is the one pre-training runs in here
(``bf16cl`` where bf16 is native, else ``fp32cl``: the pre-training default is channels_last);
the merged arm's fraction counts the separate
model's FLOPs (the useful work), so it compares directly.

Usage::

    python benchmarks/bench_model.py                       # default grid, ~5 min on 1 busy core
    python benchmarks/bench_model.py --sizes 64 --ablate   # + branch-merge A/B
    python benchmarks/bench_model.py --repeats 3 --iters 5 --out bench.md   # longer, steadier
    python benchmarks/bench_model.py --ablate-only --sizes 128,224 --iters 5   # issue 15 item 1

FLOPs come from ``torch.utils.flop_counter`` (1 multiply-add = 2 FLOPs; convolutions and matmuls
only). Training FLOPs are forward + backward; a training step also runs SGD with momentum.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from _common import MatmulReference, count_flops, environment, markdown_table, time_paired
from torch import nn

import openmednet
from openmednet.engine.precision import cpu_capability
from openmednet.models.mednet import ALL_BRANCHES, PAIRED_BRANCHES
from openmednet.utils import atomic_write_text

#: ``--merge-groups`` names: the branch kernels each merged conv computes (``MedNet.set_branch_merge``).
MERGE_GROUPS = {"all": ALL_BRANCHES, "paired": PAIRED_BRANCHES}

MODES = {"fp32": (False, False), "bf16cl": (True, True), "fp32cl": (False, True)}  # (bf16, channels_last)
NUM_CLASSES = 1000


@dataclass(frozen=True)
class Row:
    """One measured configuration (medians over repeats)."""

    model: str
    size: int
    mode: str
    phase: str
    batch: int
    gflops_per_img: float
    img_per_s: float
    fraction: float  # achieved FLOP/s / reference matmul FLOP/s (bf16 or fp32), per timed step, median

    @property
    def gflop_per_s(self) -> float:
        return self.gflops_per_img * self.img_per_s


# --------------------------------------------------------------------------------- models
def build(name: str) -> nn.Module:
    """``mednet_*`` from the OpenMedNet registry, anything else from timm (random init, no download)."""
    if name.startswith("mednet"):
        return openmednet.create_model(name, num_classes=NUM_CLASSES)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)


def in_chans(model: nn.Module) -> int:
    """Input channels (``mednet_gray``: 1, timm models and ``mednet_color``: 3)."""
    return getattr(model, "in_chans", 3)


def flops_per_image(model: nn.Module, size: int, phase: str) -> float:
    """GFLOPs per image for inference (forward) or training (forward + backward), fp32 NCHW."""
    model = copy.deepcopy(model)
    if phase == "infer":
        x = torch.zeros(1, in_chans(model), size, size)
        model.eval()
        with torch.no_grad():
            return count_flops(lambda: model(x)) / 1e9
    x = torch.randn(2, in_chans(model), size, size)  # batch 2: BatchNorm needs > 1 value per channel in train mode
    model.train()
    return count_flops(lambda: model(x).sum().backward()) / 2 / 1e9


def make_step(model: nn.Module, phase: str, mode: str, batch: int, size: int) -> Callable[[], None]:
    """A closure running one inference batch or one training step (SGD) of ``model``."""
    bf16, channels_last = MODES[mode]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_chans(model), size, size, generator=gen).contiguous(memory_format=fmt)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    if phase == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast():
                model(x)

        return infer

    model.train()
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return train


def prepare(base: str, kind: str, phase: str, mode: str, batch: int, size: int) -> tuple[Callable[[], None], float | None]:
    """Build ``base`` as ``kind`` (plain, fused, compile) and return its step and compile seconds.

    For ``compile`` the first call (which compiles) is timed and returned; it is not a warm-up
    that the timed steps would otherwise absorb.
    """
    model = build(base)
    if kind == "fused":
        model = model.eval().fuse_for_inference()
    if kind != "compile":
        return make_step(model, phase, mode, batch, size), None
    step = make_step(torch.compile(model), phase, mode, batch, size)
    start = time.perf_counter()
    step()
    return step, time.perf_counter() - start


def measure(step: Callable[[], None], gflops_img: float, batch: int, ref: MatmulReference,
            args: argparse.Namespace) -> tuple[float, float, float]:
    """Images/s, fraction of the reference matmul rate, and the median matmul FLOP/s, for one row.

    The load of a shared machine drifts: every timed step is paired with a matmul measured right
    after it, and the fraction is the median of the per-pair ratios.
    """
    timing, rates = time_paired(step, ref, warmup=args.warmup, iters=args.iters)
    work = gflops_img * 1e9 * batch
    frac = statistics.median(work / t / r for t, r in zip(timing.times, rates))
    return batch / timing.median, frac, statistics.median(rates)


# --------------------------------------------------------------------------------- the grid
def run_grid(args: argparse.Namespace, ref: MatmulReference, log: Callable[[str], None]) -> tuple[list[Row], dict]:
    """Measure every (size, mode, phase, model) row, models interleaved, ``args.repeats`` times."""
    names = [(m, "plain") for m in args.models]
    mednets = [m for m in args.models if m.startswith("mednet")]
    names += [(m, "fused") for m in mednets if not args.no_fused]
    names += [(m, "compile") for m in mednets if args.compile]
    samples: dict[tuple, list[tuple[float, float]]] = {}
    flops: dict[tuple, float] = {}
    compile_s: dict[tuple, float] = {}
    for rep in range(args.repeats):
        for size in args.sizes:
            for mode in args.modes:
                for phase in args.phases:
                    batch = (args.infer_batch if phase == "infer" else args.train_batch)[size]
                    for base, kind in names:
                        if kind == "fused" and phase == "train":
                            continue
                        label = base if kind == "plain" else f"{base}+{kind}"
                        key = (label, size, mode, phase, batch)
                        fkey = (base, size, phase)
                        if fkey not in flops:  # useful FLOPs of the plain model, for every variant
                            flops[fkey] = flops_per_image(build(base), size, phase)
                        step, seconds = prepare(base, kind, phase, mode, batch, size)
                        if seconds is not None:
                            compile_s[key] = seconds
                        img_s, frac, matmul = measure(step, flops[fkey], batch, ref, args)
                        samples.setdefault(key, []).append((img_s, frac))
                        log(f"[{rep + 1}/{args.repeats}] {label:22s} {size:4d}px {mode:7s} {phase:5s} "
                            f"b{batch:<3d} {img_s:8.1f} img/s  fraction {frac:.3f}  (matmul {matmul / 1e9:.0f} GFLOP/s)")
    rows = [
        Row(label, size, mode, phase, batch, flops[(label.split("+")[0], size, phase)],
            statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
        for (label, size, mode, phase, batch), v in samples.items()
    ]
    return rows, compile_s


# --------------------------------------------------------------------------------- ablation
def machine_mode() -> str:
    """The mode pre-training runs in here: ``engine.precision.resolve_precision`` on the pre-training
    defaults (``precision: auto``, ``channels_last: true``), so bf16 + channels_last where bf16 is
    native and fp32 + channels_last elsewhere. Asked of the engine, not restated, so the benchmark
    follows any change of those defaults."""
    from openmednet.engine.precision import resolve_precision
    from openmednet.engine.pretrain import TrainSection

    train = TrainSection()
    precision, channels_last = resolve_precision(train.precision, "cpu", train.channels_last)
    if precision == "bf16":
        return "bf16cl"  # the benchmark's only bf16 mode
    return "fp32cl" if channels_last else "fp32"


def run_ablation(args: argparse.Namespace, ref: MatmulReference, log: Callable[[str], None]) -> list[list[object]]:
    """Training step: MedNet with branches separate vs merged in ``args.merge_stages``, and ResNet-18.

    The arms are timed in interleaved rounds (``--ablate-rounds``), each step paired with the
    matmul reference (``measure``); per arm the medians over rounds of img/s and of the fraction
    of the reference, that fraction over ResNet-18's, and the speed-up over the separate arm with
    the number of rounds it won.
    """
    base = next((m for m in args.models if m.startswith("mednet")), "mednet_color")
    stages = ",".join(map(str, args.merge_stages))
    out = []
    for size in args.sizes:
        for mode in args.ablate_modes:
            batch = args.train_batch[size]
            gflops = {m: flops_per_image(build(m), size, "train") for m in (base, "resnet18")}
            separate = build(base)
            arms = {f"{base} separate": (copy.deepcopy(separate), base)}
            for name in args.merge_groups:
                arms[f"{base} stage {stages} {name}"] = (
                    copy.deepcopy(separate).set_branch_merge(args.merge_stages, MERGE_GROUPS[name]), base)
            arms["resnet18"] = (build("resnet18"), "resnet18")
            steps = {label: make_step(model, "train", mode, batch, size) for label, (model, _) in arms.items()}
            samples: dict[str, list[tuple[float, float]]] = {label: [] for label in steps}
            for rnd in range(args.ablate_rounds):
                for label, step in steps.items():
                    img_s, frac, matmul = measure(step, gflops[arms[label][1]], batch, ref, args)
                    samples[label].append((img_s, frac))
                    log(f"ablation [{rnd + 1}/{args.ablate_rounds}] {label:28s} {size:4d}px {mode:6s} b{batch:<3d} "
                        f"{img_s:8.1f} img/s  fraction {frac:.3f}  (matmul {matmul / 1e9:.0f} GFLOP/s)")
            sep_label, resnet_frac = f"{base} separate", statistics.median(f for _, f in samples["resnet18"])
            for label, values in samples.items():
                img_s = statistics.median(v[0] for v in values)
                frac = statistics.median(v[1] for v in values)
                wins = sum(a > b for (a, _), (b, _) in zip(values, samples[sep_label]))
                speed = statistics.median(a / b for (a, _), (b, _) in zip(values, samples[sep_label]))
                vs_sep = "" if label == sep_label or label == "resnet18" else f"{speed:.2f}x ({wins}/{len(values)})"
                out.append([label, size, mode, batch, f"{img_s:.1f}", f"{frac:.3f}", f"{frac / resnet_frac:.2f}", vs_sep])
    return out


# --------------------------------------------------------------------------------- report
def report(rows: list[Row], compile_s: dict, ablation: list, ref: MatmulReference, args: argparse.Namespace,
           seconds: float) -> str:
    """The markdown report: environment, params/FLOPs, all rows, MedNet vs ResNet-18, before/after."""
    parts = [
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Environment: {environment()}; run time {seconds:.0f} s" + (
            f"; torch CPU capability {cpu_capability()}; {_dtype_name(ref)} matmul reference (n={ref.n}) median {ref.median / 1e9:.0f} GFLOP/s, range "
            f"{min(ref.history) / 1e9:.0f}-{max(ref.history) / 1e9:.0f} over {len(ref.history)} measurements "
            f"(one after every timed step)." if ref.history else "."
        ),
    ]
    if rows:
        parts += _grid_tables(rows, args, _dtype_name(ref))
    if ablation:
        parts += ["", (f"Ablation, training step: MedNet's four branch convs separate (as shipped) vs merged in "
                       f"stage(s) {','.join(map(str, args.merge_stages))} (`MedNet.set_branch_merge`; "
                       + ", ".join(f"{name}: {MERGE_GROUPS[name]}" for name in args.merge_groups)
                       + f", kernel sizes per conv), and ResNet-18; {args.ablate_rounds} interleaved rounds of "
                       f"{args.iters} timed steps, medians. Fractions count the separate model's FLOPs; speed-up > 1x "
                       f"means merging is faster, in brackets the rounds where it was:"), "",
                  markdown_table(["arm", "px", "mode", "batch", "img/s", f"fraction of {_dtype_name(ref)} matmul",
                                  "fraction / ResNet-18's", "speed-up vs separate"], ablation)]
    if compile_s:
        parts += ["", "torch.compile time (first call): "
                  + ", ".join(f"{k[0]} {k[1]}px {k[2]} {k[3]}: {v:.0f} s" for k, v in compile_s.items())]
    return "\n".join(parts) + "\n"


def _grid_tables(rows: list[Row], args: argparse.Namespace, ref_dtype: str) -> list[str]:
    """Params/FLOPs, every row, MedNet vs ResNet-18, and MedNet before/after tables."""
    parts = ["", markdown_table(["model", "params (M)"] + [f"GFLOPs/img {s} px" for s in args.sizes],
                                [[m, f"{sum(p.numel() for p in build(m).parameters()) / 1e6:.2f}"]
                                 + [f"{r.gflops_per_img:.3f}" for s in args.sizes for r in rows
                                    if r.model == m and r.size == s and r.phase == "infer" and r.mode == args.modes[0]]
                                 for m in args.models]) if "infer" in args.phases else "",
             "",
             markdown_table(
                 ["model", "px", "mode", "phase", "batch", "img/s", "GFLOP/s", f"fraction of {ref_dtype} matmul"],
                 [[r.model, r.size, r.mode, r.phase, r.batch, f"{r.img_per_s:.1f}", f"{r.gflop_per_s:.1f}",
                   f"{r.fraction:.3f}"] for r in rows],
             )]
    by = {(r.model, r.size, r.mode, r.phase): r for r in rows}
    mednet = next((m for m in args.models if m.startswith("mednet")), None)
    if mednet and "resnet18" in args.models:
        cmp_rows = []
        for (m, size, mode, phase), r in by.items():
            base = by.get(("resnet18", size, mode, phase))
            if m.startswith(mednet) and base:
                cmp_rows.append([m, size, mode, phase, f"{r.fraction / base.fraction:.2f}",
                                 f"{r.img_per_s / base.img_per_s:.2f}"])
        parts += ["", "MedNet vs ResNet-18 (same run; target: fraction ratio >= 1):", "",
                  markdown_table(["model", "px", "mode", "phase", "fraction / ResNet-18's", "img/s / ResNet-18's"],
                                 cmp_rows)]
    if mednet and "fp32" in args.modes:
        ba_rows = []
        for (m, size, mode, phase), r in by.items():
            before = by.get((mednet, size, "fp32", phase))
            if m.startswith(mednet) and before and (m, mode) != (mednet, "fp32"):
                ba_rows.append([f"{m} {mode}", size, phase, f"{before.img_per_s:.1f}", f"{r.img_per_s:.1f}",
                                f"{r.img_per_s / before.img_per_s:.2f}x"])
        parts += ["", f"Before/after for {mednet} (before = fp32 NCHW, unfused):", "",
                  markdown_table(["after", "px", "phase", "img/s before", "img/s after", "speed-up"], ba_rows)]
    return parts


def _size_map(text: str) -> dict[int, int]:
    """``"64:32,224:8"`` -> ``{64: 32, 224: 8}``."""
    try:
        return {int(k): int(v) for k, v in (item.split(":") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'size:batch,...' such as '64:32,224:8', got '{text}'") from None


def _bf16_native() -> bool:
    from openmednet.engine.precision import bf16_support

    return bf16_support("cpu")[0]


def _dtype_name(ref: MatmulReference) -> str:
    return "bf16" if ref.dtype == torch.bfloat16 else "fp32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mednet_color,resnet18,resnet50", type=lambda s: s.split(","))
    p.add_argument("--sizes", default="64,224", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--modes", default=None, type=lambda s: s.split(","),
                   help="default: fp32 and the mode pre-training runs in here: bf16cl where bf16 is native "
                        "(AMX/AVX512-BF16), else fp32cl (emulated bf16 is ~9x slower and would not finish)")
    p.add_argument("--phases", default="infer,train", type=lambda s: s.split(","))
    p.add_argument("--infer-batch", default="64:32,128:16,224:8", type=_size_map, help="size:batch pairs")
    p.add_argument("--train-batch", default="64:32,128:16,224:8", type=_size_map, help="size:batch pairs")
    p.add_argument("--iters", type=int, default=3, help="timed calls per row (median taken)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="repeat the whole grid; medians over repeats")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: fair on a shared box)")
    p.add_argument("--no-fused", action="store_true", help="skip the MedNet+fused inference rows")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows for MedNet (slow to compile)")
    p.add_argument("--ablate", action="store_true", help="A/B of merging the four branch convs into one")
    p.add_argument("--ablate-only", action="store_true", help="run only the ablation, not the grid")
    p.add_argument("--ablate-rounds", type=int, default=5, help="interleaved rounds of the ablation")
    p.add_argument("--merge-stages", default="1", type=lambda s: tuple(int(v) for v in s.split(",")),
                   help="MedNet stages merged in the ablation's merged arms (MedNet.set_branch_merge)")
    p.add_argument("--merge-groups", default="all,paired", type=lambda s: s.split(","),
                   help=f"one merged arm per grouping of the branch kernels: {', '.join(MERGE_GROUPS)}")
    p.add_argument("--out", type=Path, help="also write the markdown report here")
    args = p.parse_args(argv)
    # The ablation answers "in the precision training uses here" unless modes are asked for.
    args.ablate_modes = args.modes or [machine_mode()]
    if args.modes is None:
        args.modes = list(dict.fromkeys(["fp32", machine_mode()]))  # NCHW fp32 and what training runs in
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode '{mode}', expected one of {', '.join(MODES)}")
    for phase in args.phases:
        if phase not in ("infer", "train"):
            p.error(f"unknown phase '{phase}', expected infer or train")
    if args.ablate_rounds < 1 or not set(args.merge_stages) <= {1, 2, 3, 4}:
        p.error(f"need --ablate-rounds >= 1 and --merge-stages within 1-4, got {args.ablate_rounds} and {args.merge_stages}")
    for size in args.sizes:
        if size not in args.infer_batch or size not in args.train_batch:
            p.error(f"no batch size for {size} px: add '{size}:<batch>' to --infer-batch and --train-batch")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # progress on stderr
    start = time.perf_counter()
    # The reference is the machine's fastest native dtype: a bf16 matmul on an AVX2-only CPU is
    # emulated (one 2048x2048 took 57 s) and would make every fraction meaningless.
    ref = MatmulReference(dtype=torch.bfloat16 if _bf16_native() else torch.float32)
    log(f"torch CPU capability {cpu_capability()}; reference matmul {_dtype_name(ref)}; "
        f"ablation mode(s) {','.join(args.ablate_modes)}")
    rows, compile_s = ([], {}) if args.ablate_only else run_grid(args, ref, log)
    ablation = run_ablation(args, ref, log) if args.ablate or args.ablate_only else []
    text = report(rows, compile_s, ablation, ref, args, time.perf_counter() - start)
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()

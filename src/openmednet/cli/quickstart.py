"""``openmednet quickstart``: pre-trained MedNet vs scratch vs ImageNet on the embedded demo sample."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

DEFAULT_OUT = Path("openmednet-quickstart")
DEFAULT_FEW_SHOT = [10]


def _stat(s: dict[str, float], ci: bool = True) -> str:
    """``0.912 ± 0.010 [0.88, 0.94]`` (mean ± sd over seeds, mean bootstrap interval)."""
    text = f"{s['mean']:.3f}" + ("" if math.isnan(s["sd"]) else f" ± {s['sd']:.3f}")
    if ci and "ci_low" in s:
        text += f" [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
    return text


def comparison_table(result: dict[str, Any]) -> Table:
    """The quick start's rows as a rich table; refused inits get a row saying so."""
    table = Table(title="Demo test split (300 images), full fine-tuning",
                  caption="mean ± sd over seeds [mean of the seeds' bootstrap 95% intervals]")
    for name, justify in (("init", "left"), ("budget", "left"), ("train images", "right"), ("seeds", "right"),
                          ("AUROC", "right"), ("balanced accuracy", "right")):
        table.add_column(name, justify=justify)
    for r in result["rows"]:
        table.add_row(r["label"], r["budget"], str(r["n_train"]), str(r["seeds"]), _stat(r["auroc"]),
                      _stat(r["balanced_accuracy"], ci=False))
    for r in result["refused"]:
        table.add_row(r["init"], "-", "-", "-", "[bold red]refused[/]", "[red]leakage (see below)[/]")
    return table


def register(app: typer.Typer) -> None:
    """Add the ``quickstart`` command to ``app``."""

    @app.command("quickstart")
    def quickstart_cmd(
        out: Path = typer.Option(DEFAULT_OUT, help="Study directory: report.md, report.json, plots, runs."),
        epochs: int = typer.Option(None, help="Maximum fine-tuning epochs per arm (default: measured to fit 10 min)."),
        seeds: int = typer.Option(3, help="Number of seeds (0..N-1); 3 gives a seed spread."),
        per_class: list[int] = typer.Option(DEFAULT_FEW_SHOT, "--per-class", help="Few-shot budget besides all 300 training images: N images per class (repeatable; 0 = none)."),
        image_size: int = typer.Option(64, "--image-size", help="Input side (64: the shipped weights' contract)."),
        device: str = typer.Option(None, help="cpu | cuda (default: CUDA if available)."),
        precision: str = typer.Option("auto", help="auto (bf16 where the CPU/GPU runs it natively, else fp32) | bf16 | fp32."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-arm / per-epoch log lines."),
        jobs: int = typer.Option(1, help="Arms trained at once, each in its own process with 1/N of the CPU threads (at least 1); same metrics as a sequential run with as many threads per arm."),
    ) -> None:
        """Fine-tune the shipped Gray-MedNet, the same net from scratch and ImageNet EfficientNet-Lite0 on
        700 embedded PneumoniaMNIST chest X-rays; print the comparison and write the report."""
        from openmednet.quickstart import DEFAULT_EPOCHS, run_quickstart

        result = run_quickstart(out, seeds=tuple(range(seeds)), epochs=epochs or DEFAULT_EPOCHS,
                                per_class=tuple(k for k in per_class if k > 0), image_size=image_size, device=device,
                                progress=not quiet, precision=precision, jobs=jobs)
        console = Console()
        console.print(comparison_table(result))
        for c in result["leakage_checks"]:
            console.print(f"leakage check: {c['n_leaked']} of {c['n_test']} test images of {c['target']} are in the "
                          f"pre-training corpus of {c['init']} ({Path(c['corpus']).name})")
        for r in result["refused"]:
            console.print(f"[bold red]refused:[/] {r['init']}: {r['reason']}")
        failed = result["study"]["failed"]  # a failed arm has no row: without this the table just lacked it
        for f in failed:
            console.print(f"[bold red]failed:[/] {f['init']} {f['budget']} seed {f['seed']}: {f['error']}")
        console.print(f"report: {result['report_md']}  (data: {result['report_json']})")
        at_once = f" ({result['jobs']} arms at once)" if result["jobs"] > 1 else ""
        console.print(f"elapsed: {result['elapsed_s']:.0f} s on {result['threads']} CPU thread(s) per arm{at_once}")
        if failed:
            from openmednet.cli.study import EXIT_FAILED_ARMS

            console.print(f"[bold red]{len(failed)} arm(s) failed; exit code {EXIT_FAILED_ARMS}[/]")
            raise typer.Exit(EXIT_FAILED_ARMS)

"""``openmednet pretrain``: parse arguments, resolve a ``PretrainConfig``, call ``run_pretraining``."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def _overrides(corpus: Path | None, out: Path | None, objective: str | None, resume: bool, set_: list[str]) -> list[str]:
    """``--set`` values, then the explicit flags, which win (``openmednet.config.cli_overrides``:
    JSON-quoted, so ``runs/a #1`` keeps its tail and ``2024`` stays a string)."""
    from openmednet.config import cli_overrides

    flags = {"corpus": corpus, "out": out, "objective.kind": objective, "resume": True if resume else None}
    return cli_overrides(set_, flags)


def register(app: typer.Typer) -> None:
    """Add the ``pretrain`` command to ``app``."""

    @app.command("pretrain")
    def pretrain_cmd(
        corpus: Path = typer.Option(None, help="Corpus directory (from `openmednet corpus build`)."),
        out: Path = typer.Option(None, help="Run directory: checkpoints, metrics.jsonl, loss.png, backbone/."),
        objective: str = typer.Option(
            None, help="supervised | simclr | combined | distill, or parts joined by + (supervised+distill); default: the config's."
        ),
        config: Path = typer.Option(None, exists=True, dir_okay=False, help="YAML config, e.g. configs/pretrain_gray64.yaml."),
        set_: list[str] = typer.Option([], "--set", help="Override a config key: --set optim.lr=0.1 (repeatable)."),
        resume: bool = typer.Option(False, help="Continue the run in --out from checkpoint-last.pt."),
    ) -> None:
        """Pre-train a MedNet backbone (one process, or one rank under torchrun)."""
        from openmednet.config import load_config
        from openmednet.engine.pretrain import PretrainConfig, run_pretraining
        from openmednet.engine.trainer import NonFiniteLossError

        # Command-line flags win over the config file and --set, as the most explicit choice.
        cfg = load_config(PretrainConfig, config, _overrides(corpus, out, objective, resume, set_))
        try:  # --resume on a run directory without a checkpoint: run_pretraining warns that it starts afresh
            history = run_pretraining(cfg)
        except NonFiniteLossError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(3) from None
        if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
            return
        if history:
            last = history[-1]
            summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
            typer.echo(f"done: {cfg.out} (epoch {last['epoch']}: {summary})")
        else:
            typer.echo(f"nothing to do: {cfg.out} already finished {cfg.train.epochs} epochs")

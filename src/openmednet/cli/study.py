"""``openmednet study``: run (or resume) a transfer study from a YAML grid and write its report."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``study`` command to ``app``."""

    @app.command("study")
    def study_cmd(
        config: Path = typer.Option(..., exists=True, dir_okay=False, help="Study YAML (see openmednet.eval.study)."),
        set_: list[str] = typer.Option([], "--set", help="Override a field: --set seeds=[0,1,2] --set finetune.epochs=20."),
    ) -> None:
        """Targets x inits x strategies x label budgets x seeds; resumable; writes report.md/json."""
        from openmednet.config import load_config
        from openmednet.eval.study import StudyConfig, run_study

        cfg = load_config(StudyConfig, config, set_)
        result = run_study(cfg)
        typer.echo(f"{len(result['arms'])} arms, {len(result['refused'])} refused; report: {Path(cfg.out) / 'report.md'}")

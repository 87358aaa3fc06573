"""``openmednet study``: run (or resume) a transfer study from a YAML grid and write its report.

    openmednet study --config study.yaml --jobs 2                    # 2 arms at once, half the threads each
    openmednet study --config study.yaml --num-parts 2 --part 0      # machine 1 (--part 1 on machine 2)
    openmednet study --config study.yaml --report-only               # report every finished arm in out

Exit codes: 0 every arm trained (or was refused for leakage, as reported), 2 a configuration
error, 3 some arms failed (the report lists them; the next run retries them) or, with
--report-only, are missing (a part not run yet, or failed there): the report is then partial.
"""

from __future__ import annotations

from pathlib import Path

import typer

#: Exit code when some arms failed (the others are trained and reported), as ``predict`` exits 3
#: when some files were skipped: the report is written, and a script still sees the failure.
EXIT_FAILED_ARMS = 3


def register(app: typer.Typer) -> None:
    """Add the ``study`` command to ``app``."""

    @app.command("study")
    def study_cmd(
        config: Path = typer.Option(..., exists=True, dir_okay=False, help="Study YAML (see openmednet.eval.study)."),
        set_: list[str] = typer.Option([], "--set", help="Override a field: --set seeds=[0,1,2] --set finetune.epochs=20."),
        jobs: int = typer.Option(1, help="Arms trained at once, each in its own process with 1/N of the threads "
                                         "(OMP_NUM_THREADS; at least 1). Same metrics as a sequential run with as "
                                         "many threads per arm, e.g. OMP_NUM_THREADS=1 with and without --jobs."),
        num_parts: int = typer.Option(1, help="Split the grid over this many machines (same config and out)..."),
        part: int = typer.Option(0, help="...and train this part (0-based: every num_parts-th arm from this one); "
                                         "its report goes to out/parts/; join with --report-only."),
        report_only: bool = typer.Option(False, "--report-only", help="Train nothing: report the finished arms in "
                                         "out (e.g. of every part); unfinished ones are listed as missing "
                                         "(exit code 3)."),
    ) -> None:
        """Targets x inits x strategies x label budgets x seeds; resumable; writes report.md/json."""
        from openmednet.config import load_config
        from openmednet.eval.study import StudyConfig, run_study

        cfg = load_config(StudyConfig, config, set_)
        result = run_study(cfg, jobs=jobs, num_parts=num_parts, part=part, report_only=report_only)
        where = Path(cfg.out) / (f"parts/part{part}-of-{num_parts}" if num_parts > 1 else "")
        missing = f", {len(result['missing'])} missing" if report_only else ""
        typer.echo(f"{len(result['arms'])} arms, {len(result['failed'])} failed, {len(result['refused'])} refused"
                   f"{missing}; report: {where / 'report.md'}")
        if result["failed"]:  # exit 0 here let a pipeline go on with a study whose every arm had failed
            typer.secho(f"{len(result['failed'])} arm(s) failed (errors in the log and under 'Failed arms' in the "
                        f"report; a resume retries them); exit code {EXIT_FAILED_ARMS}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_FAILED_ARMS)
        if report_only and result["missing"]:  # a merge of parts with one not run (or failed) is no full report
            typer.secho(f"{len(result['missing'])} arm(s) missing (not finished by any part; listed in the report); "
                        f"exit code {EXIT_FAILED_ARMS}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_FAILED_ARMS)

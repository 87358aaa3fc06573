"""``openmednet finetune``: fine-tune a model on a labelled target and evaluate it on its test split."""

from __future__ import annotations

from pathlib import Path

import typer

# CLI flag -> FinetuneConfig field, for the flags that are just config values.
_FLAGS = ("data", "out", "init", "arch", "strategy", "freeze_k", "epochs", "lr", "batch_size", "image_size",
          "label_fraction", "per_class", "seed", "semi", "unlabelled", "rounds", "task")


def _overrides(values: dict, set_: list[str]) -> list[str]:
    """``--set`` items, then the explicit flags, which win (``openmednet.config.cli_overrides``)."""
    from openmednet.config import cli_overrides

    return cli_overrides(set_, {key: values[key] for key in _FLAGS})


def register(app: typer.Typer) -> None:
    """Add the ``finetune`` command to ``app``."""

    @app.command("finetune")
    def finetune_cmd(
        data: Path = typer.Option(None, help="Target: folder with labels.csv (path,label,split,group) or class sub-folders, or a .npz."),
        init: str = typer.Option(None, help="auto | <model>[.<tag>] (pre-trained) | scratch:<model> | path to saved weights."),
        out: Path = typer.Option(None, help="Run directory for metrics.json, plots and the model."),
        arch: str = typer.Option(None, help="Architecture of a bare weights file given as --init."),
        strategy: str = typer.Option(None, help="full | linear_probe | freeze_k | meanvar."),
        freeze_k: int = typer.Option(None, "--freeze-k", help="Blocks frozen after the stem (strategy freeze_k)."),
        epochs: int = typer.Option(None, help="Maximum epochs (early stopping on validation AUROC)."),
        lr: float = typer.Option(None, help="Backbone learning rate (the new head gets head_lr_mult x)."),
        batch_size: int = typer.Option(None, "--batch-size"),
        image_size: int = typer.Option(None, "--image-size", help="Input side; default: the init's contract."),
        label_fraction: float = typer.Option(None, "--label-fraction", help="Train on this fraction of each class."),
        per_class: int = typer.Option(None, "--per-class", help="Train on N images per class (few-shot)."),
        seed: int = typer.Option(None),
        semi: str = typer.Option(None, help="none | pseudo_label | fixmatch | freematch: also learn from unlabelled images."),
        unlabelled: list[str] = typer.Option(None, help="Unlabelled images: a folder/.npz any reader accepts "
                                             "(repeat for several), or rest_of_train (train images outside the budget)."),
        rounds: int = typer.Option(None, help="pseudo_label: teacher-student rounds (a larger value extends a run)."),
        task: str = typer.Option(None, help="classification | segmentation (--data: masks.csv + classes.txt; a U-Net on the init)."),
        config: Path = typer.Option(None, exists=True, dir_okay=False, help="YAML with FinetuneConfig fields."),
        set_: list[str] = typer.Option([], "--set", help="Override any config field: --set leakage=error."),
    ) -> None:
        """Fine-tune, choose the best epoch on validation, evaluate once on test."""
        from openmednet.config import load_config
        from openmednet.eval.finetune import FinetuneConfig, run_finetune
        from openmednet.eval.report import metrics_table_md

        values = {"data": data, "out": out, "init": init, "arch": arch, "strategy": strategy, "freeze_k": freeze_k,
                  "epochs": epochs, "lr": lr, "batch_size": batch_size, "image_size": image_size,
                  "label_fraction": label_fraction, "per_class": per_class, "seed": seed, "semi": semi,
                  "unlabelled": unlabelled, "rounds": rounds, "task": task}
        try:
            cfg = load_config(FinetuneConfig, config, _overrides(values, set_))
        except ValueError as e:
            if not str(e).startswith("missing required"):  # a missing field (data, out) has flags to name
                raise
            raise ValueError(f"{e}: give --data and --out (or set them in --config)") from None
        _warn_unread_semi_settings(cfg)
        result = run_finetune(cfg)
        test = result.metrics["test"]
        typer.echo(f"test set: {test['n']} images, best epoch {result.metrics['best_epoch']}")
        if cfg.task == "segmentation":  # the headline is Dice/IoU; per class in metrics.json
            from openmednet.eval.segmentation import SEGMENTATION_HEADLINE as headline
        else:
            headline = ("auroc_macro", "balanced_accuracy", "accuracy", "f1_macro", "ece")
        typer.echo(metrics_table_md(test, headline), nl=False)
        typer.echo(f"outputs: {result.out}")


def _warn_unread_semi_settings(cfg) -> None:
    """Say which semi-supervised settings this run's ``--semi`` ignores (e.g. ``sat_momentum`` with
    fixmatch): a single run names one method, so a changed setting it does not read is a mistake
    (a study's shared settings serve several methods; ``run_study`` checks them against its grid)."""
    from openmednet.eval.semi import unread_semi_message, unread_semi_settings

    unread = unread_semi_settings(cfg, [cfg.semi])
    if unread:
        typer.secho(f"warning: {unread_semi_message(unread, [cfg.semi])}", fg=typer.colors.YELLOW, err=True)

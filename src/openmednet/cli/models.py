"""``openmednet models``: list and describe registered architectures and weight sets."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer) -> None:
    """Add the ``models`` command group to ``app``."""
    group = typer.Typer(help="List and describe models and weights.", no_args_is_help=True)
    app.add_typer(group, name="models")

    @group.command("list")
    def list_cmd(
        pattern: str = typer.Argument("*", help="Shell pattern, e.g. 'mednet_*'."),
        pretrained: bool = typer.Option(False, help="List weight sets (arch.tag) instead of architectures."),
    ) -> None:
        """List registered models."""
        from openmednet.models import list_models

        for name in list_models(pattern, pretrained=pretrained):
            typer.echo(name)

    @group.command("describe")
    def describe_cmd(
        name: str = typer.Argument(..., help="Architecture or weight set."),
        size: int = typer.Option(64, help="Input size (pixels) for the FLOP count."),
    ) -> None:
        """Parameters, FLOPs, feature maps and input contract of a model."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from openmednet.models import create_model

        model = create_model(name).eval()
        in_chans = getattr(model, "in_chans", 3)
        x = torch.zeros(1, in_chans, size, size)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
        table = Table(title=name, show_header=False)
        table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()):,}")
        table.add_row(f"GFLOPs at {size} px", f"{fc.get_total_flops() / 1e9:.3f}")
        table.add_row("convolutions", str(sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())))
        for info in getattr(model, "feature_info", []):
            table.add_row(f"features {info['module']}", f"{info['num_chs']} ch, stride {info['reduction']}")
        cfg = getattr(model, "pretrained_cfg", None)
        if cfg is not None:
            table.add_row("input", f"{cfg.input_size}, mean {cfg.mean}, std {cfg.std}, {cfg.intensity}")
        Console().print(table)

"""``openmednet models``: list and describe registered architectures and weight sets."""

from __future__ import annotations

from pathlib import Path

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
        markdown: bool = typer.Option(False, "--markdown", help="Print a mermaid diagram and tables (MedNet)."),
    ) -> None:
        """Parameters, FLOPs, feature maps and input contract of a model."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from openmednet.models import create_model

        model = create_model(name).eval()
        if markdown:
            from openmednet.models.describe import describe_markdown

            typer.echo(describe_markdown(model, name, sizes=(size,)))
            return
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

    @group.command("card")
    def card_cmd(
        path: Path = typer.Argument(..., help="Directory written by save_pretrained, or a model card .json."),
        verify: bool = typer.Option(
            True, help="Load the model as load_pretrained does: checksum, safetensors only, card vs "
            "architecture and weights, finite values."
        ),
    ) -> None:
        """Show a saved model's card: architecture, input contract, provenance, metrics, checksum."""
        from openmednet.models import load_pretrained, read_model_card
        from openmednet.models._weights import resolve_card_path

        card = read_model_card(path)  # the card's own checks (file names, architecture, tensor shapes)
        weights = resolve_card_path(path).parent / card.weights_file
        if verify:
            # "verified" means exactly what loading checks; any refusal is one red line from the CLI.
            load_pretrained(path)
        table = Table(title=f"{card.architecture}" + (f".{card.tag}" if card.tag else ""), show_header=False)
        table.add_row("model_args", ", ".join(f"{k}={v}" for k, v in card.model_args.items()))
        table.add_row("weights", f"{weights} ({card.num_params:,} parameters)")
        table.add_row("sha256", card.sha256 + ("  [green]verified[/]" if verify else ""))
        table.add_row("input", f"{card.input_size}, mean {card.mean}, std {card.std}, {card.intensity}")
        table.add_row("head", f"{card.num_classes} classes {list(card.label_names) or ''}")
        table.add_row("data", ", ".join(card.data) or "-")
        table.add_row("objective", f"{card.objective or '-'}, {card.epochs} epochs")
        for name, value in card.metrics.items():
            table.add_row(f"metric {name}", f"{value:.4g}" if isinstance(value, float) else str(value))
        table.add_row("license", card.license)
        table.add_row("created", f"{card.created} ({', '.join(f'{k} {v}' for k, v in card.software.items())})")
        Console().print(table)

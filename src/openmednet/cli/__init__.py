"""Command-line interface (Typer). Nothing in the library imports this package."""

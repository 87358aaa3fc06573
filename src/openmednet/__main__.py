"""``python -m openmednet`` runs the CLI."""

from openmednet.cli.app import main

main()

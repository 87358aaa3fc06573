"""Regenerate the generated sections of docs/architecture.md from the model code.

The prose of the document is hand-written; the mermaid diagram, the block table and the
parameter/FLOP table sit between ``<!-- generated:NAME -->`` markers and come from
``openmednet.models.describe.architecture_sections`` (read from the built models, FLOPs counted by
``torch.utils.flop_counter``). ``tests/models/test_describe.py`` fails when the diagram or block
table no longer match the code.

Usage::

    python benchmarks/make_architecture_doc.py          # rewrite docs/architecture.md in place
    python benchmarks/make_architecture_doc.py --check  # exit 1 if the document is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from openmednet.models.describe import architecture_sections, update_generated
from openmednet.utils import atomic_write_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--doc", type=Path, default=DOC, help="markdown file with generated:NAME markers")
    p.add_argument("--check", action="store_true", help="only report whether the file is up to date")
    args = p.parse_args(argv)
    if not args.doc.is_file():
        p.error(f"{args.doc} not found: create it with the '<!-- generated:NAME -->' markers first")
    torch.set_num_threads(1)
    text = args.doc.read_text()
    new = update_generated(text, architecture_sections(sizes=(64, 224)))
    if args.check:
        print(f"{args.doc}: {'up to date' if new == text else 'STALE (run without --check)'}")
        return int(new != text)
    if new != text:
        atomic_write_text(args.doc, new)
    print(f"{args.doc}: {'rewritten' if new != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

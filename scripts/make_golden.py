"""Write the golden record (``assets/golden/<arch>.<tag>.json``) of shipped weight sets.

Run after shipping or re-shipping weights (from the repository root)::

    .venv/bin/python scripts/make_golden.py                      # every shipped weight set
    .venv/bin/python scripts/make_golden.py mednet_gray.distill_cpu128_v2

See ``openmednet.eval.golden`` for what is recorded and why.
"""

from __future__ import annotations

import sys

import torch

from openmednet.eval.golden import golden_dir, golden_record
from openmednet.models import create_model, list_pretrained_cfgs


def shipped_weight_sets() -> list[str]:
    """``arch.tag`` of every weight set shipped in the package."""
    return sorted(name for name, cfg in list_pretrained_cfgs().items() if cfg.source == "package")


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    for name in names or shipped_weight_sets():
        model = create_model(name, pretrained=True, num_classes=0)
        record = golden_record(name, model)
        path = golden_dir() / f"{name}.json"
        path.write_text(record.to_json())
        print(f"wrote {path} ({len(record.images)} images at {record.input_size})")


if __name__ == "__main__":
    main(sys.argv[1:])

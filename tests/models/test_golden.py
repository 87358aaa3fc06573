"""Golden outputs: every shipped weight set reproduces its recorded features on the embedded demo
images, and a preprocessing mistake is caught (openmednet.eval.golden)."""

from __future__ import annotations

import dataclasses

import pytest

from openmednet.eval.golden import check_golden, golden_dir, golden_images
from openmednet.models import create_model, list_pretrained_cfgs

SHIPPED = sorted(name for name, cfg in list_pretrained_cfgs().items() if cfg.source == "package")


def test_there_are_shipped_weights_and_demo_images():
    assert SHIPPED, "no shipped weight sets found"
    assert len(golden_images(1)) == 2 and len(golden_images(3)) == 2


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_reproduce_their_golden_features(name: str):
    assert (golden_dir() / f"{name}.json").is_file(), f"run scripts/make_golden.py {name}"
    model = create_model(name, pretrained=True, num_classes=0)
    assert check_golden(name, model) == []


def test_a_wrong_normalisation_is_caught():
    name = SHIPPED[0]
    model = create_model(name, pretrained=True, num_classes=0)
    cfg = model.pretrained_cfg
    model.pretrained_cfg = dataclasses.replace(cfg, std=tuple(2 * s for s in cfg.std))
    errors = check_golden(name, model)
    assert len(errors) == 2 and all("max feature difference" in e for e in errors)

"""ModelCard holds a PretrainedCfg; its flat JSON layout is mapped in one table (``_card._CFG_LAYOUT``).

The shipped cards are the compatibility contract: reading one and writing it again must give the
file's own bytes, so cards saved before the card held a ``PretrainedCfg`` read and write unchanged.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from openmednet.models import ModelCard, PretrainedCfg, create_model, read_model_card, save_pretrained
from openmednet.models._builder import package_weights_dir
from openmednet.models._card import _NOT_IN_CARD, CARD_CFG_FIELDS, card_cfg

SHIPPED = sorted(package_weights_dir().glob("*.json"))


def test_every_pretrained_cfg_field_is_in_the_card_or_declared_outside_it():
    # A field added to PretrainedCfg must be placed in the card's JSON layout (or declared not stored).
    names = {f.name for f in dataclasses.fields(PretrainedCfg)}
    assert names == set(CARD_CFG_FIELDS) | _NOT_IN_CARD
    assert not set(CARD_CFG_FIELDS) & _NOT_IN_CARD


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_card_reads_and_writes_back_to_its_own_bytes(path):
    card = read_model_card(path)
    assert isinstance(card.pretrained_cfg, PretrainedCfg)
    assert json.dumps(card.to_dict(), indent=2) + "\n" == path.read_text(encoding="utf-8")
    assert ModelCard.from_dict(card.to_dict()) == card


def test_card_fields_are_read_through_its_pretrained_cfg(tmp_path):
    model = create_model("mednet_test", num_classes=2)
    card = save_pretrained(model, tmp_path, label_names=["no", "yes"], mean=[0.4], license="CC-BY-4.0")
    cfg = card.pretrained_cfg
    assert (card.input_size, card.mean, card.label_names, card.license) == ((1, 64, 64), (0.4,), ("no", "yes"), "CC-BY-4.0")
    assert all(getattr(card, name) == getattr(cfg, name) for name in CARD_CFG_FIELDS)
    # Where the model's weights came from is the reader's business, not the card's.
    assert cfg == card_cfg(model.pretrained_cfg, **{n: getattr(cfg, n) for n in CARD_CFG_FIELDS})
    assert (cfg.file, cfg.source, cfg.meta) == (None, "package", {})
    with pytest.raises(AttributeError, match="no attribute 'file'"):
        card.file  # noqa: B018
    registry_view = card.to_pretrained_cfg(source="file", file=str(tmp_path / card.weights_file))
    assert registry_view.replace(file=None, source="package", meta={}) == cfg
    assert registry_view.meta["architecture"] == "mednet_test"

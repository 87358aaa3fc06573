"""Corpus fingerprints: written from a real corpus, named in model cards, verified, used by the study."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openmednet import create_model
from openmednet.data.corpus import build_corpus
from openmednet.data.dedupe import phash64, phash256
from openmednet.data.fingerprint import (
    load_corpus_fingerprint,
    pretraining_hashes,
    save_corpus_fingerprint,
)
from openmednet.data.shards import CorpusArrays
from openmednet.data.sources import SourceSpec
from openmednet.eval.study import check_pretraining_leakage, shipped_corpus_fingerprint
from openmednet.models import (
    corpus_fingerprint_file,
    load_pretrained,
    read_model_card,
    record_corpus_fingerprint,
    save_pretrained,
)
from openmednet.quickstart import demo_path
from openmednet.utils import sha256_file

# Demo images (PneumoniaMNIST, 28 px chest X-rays) used as a tiny "pre-training corpus".
TRAIN_ROWS = (0, 40, 80, 160, 200, 260)
TEST_ROWS = (3, 150)


def _write_pngs(folder: Path, images: np.ndarray, rows: tuple[int, ...], prefix: str) -> None:
    (folder / "xray").mkdir(parents=True, exist_ok=True)
    for r in rows:
        Image.fromarray(images[r]).save(folder / "xray" / f"{prefix}{r}.png")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus built by the real builder from 6 train and 2 test images of the demo sample."""
    tmp = tmp_path_factory.mktemp("fp")
    with np.load(demo_path()) as z:
        _write_pngs(tmp / "src", z["train_images"], TRAIN_ROWS, "train")
        _write_pngs(tmp / "src", z["test_images"], TEST_ROWS, "test")
    build_corpus([SourceSpec(name="demo_cxr", root=tmp / "src")], tmp / "corpus", channels=1, image_size=32)
    return tmp / "corpus"


def test_fingerprint_round_trip_keeps_every_hash_and_the_manifest_facts(corpus: Path, tmp_path: Path) -> None:
    arrays = CorpusArrays(corpus)
    written = save_corpus_fingerprint(corpus, tmp_path / "w.corpus.npz")
    fp = load_corpus_fingerprint(tmp_path / "w.corpus.npz")
    np.testing.assert_array_equal(fp.phash, arrays.phash)
    assert fp.phash.dtype == np.uint64 and fp.phash256.shape == (len(arrays), 4)
    np.testing.assert_array_equal(fp.phash256, written.phash256)
    fine = [r["phash256"] for r in arrays.iter_records()]
    assert [("".join(f"{int(v):016x}" for v in row)) for row in fp.phash256] == fine
    assert fp.source_counts == {"demo_cxr": len(arrays)}
    assert fp.facts["num_images"] == len(arrays) == arrays.manifest.num_images
    assert fp.facts["manifest_sha256"] == hashlib.sha256((corpus / "manifest.json").read_bytes()).hexdigest()
    assert fp.facts["image_size"] == 32 and fp.facts["channels"] == 1
    # The fingerprint answers like the corpus itself.
    for a, b in zip(pretraining_hashes(corpus), pretraining_hashes(tmp_path / "w.corpus.npz"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_damaged_or_missing_fingerprints_are_clear_errors(corpus: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.corpus.npz", phash=np.zeros(3, np.uint64))
    with pytest.raises(ValueError, match="not a corpus fingerprint: keys"):
        load_corpus_fingerprint(tmp_path / "bad.corpus.npz")
    (tmp_path / "trunc.corpus.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_corpus_fingerprint(tmp_path / "trunc.corpus.npz")
    with pytest.raises(FileNotFoundError, match="expected a corpus directory or a"):
        pretraining_hashes(tmp_path / "nowhere.corpus.npz")


def test_pretraining_leakage_finds_exactly_the_test_images_in_the_corpus(corpus: Path, tmp_path: Path) -> None:
    save_corpus_fingerprint(corpus, tmp_path / "w.corpus.npz")
    with np.load(demo_path()) as z:
        test = z["test_images"][[3, 150, 7, 220]]  # the first two are in the corpus
    hashes = np.array([phash64(a) for a in test], dtype=np.uint64)
    fine = np.stack([phash256(a) for a in test])
    for source in (corpus, tmp_path / "w.corpus.npz"):
        pairs = check_pretraining_leakage(hashes, source, 6, test_fine=fine)
        assert sorted({i for i, _, _ in pairs}) == [0, 1]
        assert all(d == 0 for i, _, d in pairs)


def test_weights_card_names_the_fingerprint_and_loading_verifies_it(corpus: Path, tmp_path: Path) -> None:
    save_corpus_fingerprint(corpus, tmp_path / "elsewhere.npz")
    torch.manual_seed(0)
    backbone = create_model("mednet_gray", width_mult=0.25, num_classes=0)
    card = save_pretrained(backbone, tmp_path / "w", tag="t1", corpus_fingerprint=tmp_path / "elsewhere.npz")
    placed = tmp_path / "w" / "mednet_gray.t1.corpus.npz"
    assert card.corpus_fingerprint == placed.name
    assert card.corpus_fingerprint_sha256 == sha256_file(placed) == sha256_file(tmp_path / "elsewhere.npz")
    assert read_model_card(tmp_path / "w" / "mednet_gray.t1.json") == card
    assert corpus_fingerprint_file(tmp_path / "w" / "mednet_gray.t1.json") == placed
    assert shipped_corpus_fingerprint(str(tmp_path / "w" / "mednet_gray.t1.json"), channels=1) == placed
    assert shipped_corpus_fingerprint("scratch:mednet_gray", channels=1) is None
    assert shipped_corpus_fingerprint("efficientnet_lite0", channels=1) is None  # ImageNet: none shipped

    blob = bytearray(placed.read_bytes())
    blob[-10] ^= 0xFF
    placed.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum mismatch"):
        corpus_fingerprint_file(tmp_path / "w" / "mednet_gray.t1.json")
    placed.unlink()
    with pytest.raises(FileNotFoundError, match="names the corpus fingerprint mednet_gray.t1.corpus.npz"):
        corpus_fingerprint_file(tmp_path / "w" / "mednet_gray.t1.json")


def test_record_corpus_fingerprint_updates_an_existing_card(corpus: Path, tmp_path: Path) -> None:
    save_corpus_fingerprint(corpus, tmp_path / "fp.npz")
    save_pretrained(create_model("mednet_test", num_classes=0), tmp_path / "w")
    before = json.loads((tmp_path / "w/model_card.json").read_text())
    assert before["provenance"]["corpus_fingerprint"] is None
    updated = record_corpus_fingerprint(tmp_path / "w", tmp_path / "fp.npz")
    after = json.loads((tmp_path / "w/model_card.json").read_text())
    assert after["provenance"]["corpus_fingerprint"] == {"file": "model.corpus.npz",
                                                         "sha256": sha256_file(tmp_path / "fp.npz")}
    assert after["weights"] == before["weights"]  # weights and their checksum untouched
    assert updated.corpus_fingerprint == "model.corpus.npz"
    assert corpus_fingerprint_file(tmp_path / "w") == tmp_path / "w/model.corpus.npz"


def test_a_feature_extractor_backbone_fine_tunes_with_a_new_nested_head(tmp_path: Path) -> None:
    """Pre-training exports num_classes=0 backbones; MedNet's head (fc1 -> fc) is then all new."""
    torch.manual_seed(0)
    backbone = create_model("mednet_test", num_classes=0).eval()
    save_pretrained(backbone, tmp_path / "w")
    model = load_pretrained(tmp_path / "w", num_classes=2).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), backbone.forward_features(x), rtol=0, atol=0)
        assert model(x).shape == (2, 2)


def test_finetune_records_test_images_found_in_the_inits_fingerprint(corpus: Path, tmp_path: Path) -> None:
    from openmednet.eval.finetune import FinetuneConfig, check_init_corpus, prepare_splits
    from openmednet.eval.targets import load_target

    save_corpus_fingerprint(corpus, tmp_path / "fp.npz")
    save_pretrained(create_model("mednet_test", num_classes=0), tmp_path / "w", corpus_fingerprint=tmp_path / "fp.npz")
    target = load_target(demo_path())
    cfg = FinetuneConfig(data=demo_path(), out=tmp_path / "run", init=str(tmp_path / "w"))
    cleaned, splits, _ = prepare_splits(target, cfg)
    with pytest.warns(UserWarning, match="2 of 300 test images .* are in the pre-training corpus"):
        found = check_init_corpus(cfg, cleaned, splits)
    assert found == {"corpus": "model.corpus.npz", "n_test": 300,
                     "test_ids_in_corpus": sorted(f"pneumoniamnist_demo.npz#test/{r}" for r in TEST_ROWS)}
    strict = FinetuneConfig(data=demo_path(), out=tmp_path / "run", init=str(tmp_path / "w"), leakage="error")
    with pytest.raises(ValueError, match="evaluate on other test images"):
        check_init_corpus(strict, cleaned, splits)
    scratch = FinetuneConfig(data=demo_path(), out=tmp_path / "run", init="scratch:mednet_test")
    assert check_init_corpus(scratch, cleaned, splits) is None

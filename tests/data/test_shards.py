"""The shard format: atomic shards, manifest round trip, memory-mapped reads, clear errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from openmednet.data.images import resize_to_square
from openmednet.data.shards import (
    FORMAT_VERSION,
    META_FIELDS,
    CorpusArrays,
    CorpusManifest,
    ShardInfo,
    complete_shards,
    write_shard,
)


@pytest.fixture()
def real_images(shared_data):
    paths = sorted((shared_data / "gray/pretrain/covid_cxr_figure1/images").glob("*.jpg"))[:7]
    return np.stack([resize_to_square(np.asarray(Image.open(p).convert("L")), 32)[None] for p in paths]), paths


def _meta(n: int, offset: int = 0) -> dict[str, np.ndarray]:
    return {
        "label": np.arange(n) % 2,
        "source": np.zeros(n),
        "split": np.arange(n) % 3,
        "group": np.arange(n) + offset,
        "phash": np.arange(n, dtype=np.uint64) + np.uint64(2**63),
    }


def _corpus(root, images, paths):
    shards = [
        write_shard(root, 0, images[:4], _meta(4), [{"path": str(p)} for p in paths[:4]]),
        write_shard(root, 1, images[4:], _meta(3, 4), [{"path": str(p)} for p in paths[4:]]),
    ]
    m = CorpusManifest(FORMAT_VERSION, 1, 32, shards, [{"name": "covid"}], ["covid/a", "covid/b"])
    m.save(root)
    return m


def test_round_trip_reads_the_same_pixels_and_meta(tmp_path, real_images):
    images, paths = real_images
    _corpus(tmp_path, images, paths)
    arrays = CorpusArrays(tmp_path)
    assert len(arrays) == 7 and arrays.manifest.num_images == 7
    for i in range(7):
        np.testing.assert_array_equal(arrays.image(i), images[i])
    assert arrays.locate(5) == (1, 1)
    np.testing.assert_array_equal(arrays.group, [0, 1, 2, 3, 4, 5, 6])
    assert arrays.phash.dtype == np.uint64 and int(arrays.phash[0]) == 2**63
    assert [r["path"] for r in arrays.iter_records()] == [str(p) for p in paths]
    # images are opened as memory maps, never read whole
    assert isinstance(arrays._images(0), np.memmap)
    with pytest.raises(IndexError, match="out of range"):
        arrays.image(7)


def test_pickled_arrays_reopen_their_memory_maps(tmp_path, real_images):
    images, paths = real_images
    _corpus(tmp_path, images, paths)
    arrays = CorpusArrays(tmp_path)
    arrays.image(0)
    clone = pickle.loads(pickle.dumps(arrays))
    assert clone._maps == {}
    np.testing.assert_array_equal(clone.image(6), images[6])


def test_half_written_shards_are_invisible(tmp_path, real_images):
    images, _ = real_images
    write_shard(tmp_path, 0, images[:2], _meta(2), [{}, {}])
    (tmp_path / "shard-00001.tmp").mkdir()
    np.save(tmp_path / "shard-00001.tmp" / "images.npy", images[2:4])
    assert complete_shards(tmp_path) == [0]


def test_write_shard_rejects_bad_input(tmp_path, real_images):
    images, _ = real_images
    with pytest.raises(ValueError, match="uint8"):
        write_shard(tmp_path, 0, images.astype(np.float32), _meta(7), [{}] * 7)
    with pytest.raises(KeyError, match="phash"):
        write_shard(tmp_path, 0, images, {k: v for k, v in _meta(7).items() if k != "phash"}, [{}] * 7)
    with pytest.raises(ValueError, match="same length"):
        write_shard(tmp_path, 0, images, _meta(7), [{}] * 6)
    assert set(META_FIELDS) == set(_meta(1))


def test_manifest_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="openmednet corpus build"):
        CorpusManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="rebuild the corpus"):
        CorpusManifest.load(tmp_path)
    # Regression (hostile-user probe): a manifest without its fields said only "error: shards", and a
    # damaged one gave the JSON parser's message without the file.
    for text, says in ((json.dumps({"version": FORMAT_VERSION}), "not a complete corpus manifest .*'shards'"),
                       ("{bad", "manifest.json is not valid JSON"), ("[1]", "holds list, not a corpus manifest")):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match=f"{says}.*rebuild the corpus"):
            CorpusManifest.load(tmp_path)
    m = CorpusManifest(FORMAT_VERSION, 3, 64, [ShardInfo("shard-00000", 5)], [], [])
    m.save(tmp_path)
    assert CorpusManifest.load(tmp_path).num_images == 5

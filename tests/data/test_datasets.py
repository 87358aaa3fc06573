"""CorpusDataset, LabelledDataset and build_loader on tiny corpora of real images."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from tiny_corpus import load_square, read_labels, write_tiny_corpus

from openmednet.data.datasets import CorpusDataset, LabelledDataset
from openmednet.data.loader import build_loader
from openmednet.data.sources import SourceSpec, iter_source
from openmednet.data.transforms import build_multiview_transform, build_transform

GRAY_CFG = {"input_size": (1, 32, 32), "mean": (0.5,), "std": (0.25,)}


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """22 real gray images: 12 brain MRI (4 classes x 3) and 10 knee X-rays (5 grades x 2)."""
    rows = {
        "mri": read_labels(shared_data / "gray/pretrain/brain_tumor_mri", 3),
        "knee": read_labels(shared_data / "gray/pretrain/knee_oa", 2),
    }
    root = tmp_path_factory.mktemp("corpus")
    write_tiny_corpus(root, rows, channels=1, size=32)
    return root, rows


def test_corpus_dataset_returns_stored_pixels_label_and_source(corpus):
    root, rows = corpus
    ds = CorpusDataset(root)
    assert len(ds) == 22 and ds.channels == 1 and ds.image_size == 32
    image, label, source = ds[13]  # second knee image
    path, grade, _ = rows["knee"][1]
    assert torch.equal(image, torch.from_numpy(load_square(path, 32, 1)))
    assert ds.label_names[label] == f"knee/{grade}" and ds.source_names[source] == "knee"
    np.testing.assert_array_equal(ds.sources, [0] * 12 + [1] * 10)


def test_corpus_dataset_filters(corpus):
    root, rows = corpus
    train = CorpusDataset(root, "train")
    expected = [i for i, (_, _, s) in enumerate(rows["mri"] + rows["knee"]) if s == "train"]
    np.testing.assert_array_equal(train.indices, expected)
    knee = CorpusDataset(root, sources=["knee"], transform=build_transform(GRAY_CFG, train=False))
    assert len(knee) == 10 and set(knee.sources.tolist()) == {1}
    image, _, _ = knee[0]
    assert image.dtype == torch.float32 and image.shape == (1, 32, 32)
    with pytest.raises(KeyError, match="did you mean 'knee'"):
        CorpusDataset(root, sources=["knees"])
    with pytest.raises(KeyError, match="did you mean 'train'"):
        CorpusDataset(root, "trian")


def test_loader_shards_the_corpus_across_ranks(corpus):
    root, _ = corpus
    ds = CorpusDataset(root)
    seen = []
    for rank in range(3):
        loader = build_loader(ds, batch_size=4, world_size=3, rank=rank, seed=0, shuffle=False)
        seen += [int(s) * 100 + int(lab) for _, labs, srcs in loader for lab, s in zip(labs, srcs)]
    expected = [int(s) * 100 + int(lab) for s, lab in zip(ds.sources, ds.labels)]
    assert sorted(seen) == sorted(expected)  # evaluation: every image exactly once, no padding
    lengths = {len(build_loader(ds, batch_size=1, world_size=3, rank=r).sampler) for r in range(3)}
    assert lengths == {8}  # training: padded to equal lengths (22 -> 24)


def test_source_balanced_loader(corpus):
    root, _ = corpus
    ds = CorpusDataset(root)
    loader = build_loader(ds, batch_size=22, balance="source", seed=1)
    sources = []
    for epoch in range(60):
        loader.sampler.set_epoch(epoch)
        sources += [int(s) for _, _, batch in loader for s in batch]
    # 1320 draws, p = 0.5 each (natural mix: 12/22 = 0.545); sd 0.014
    assert abs(np.mean(sources) - 0.5) < 0.045
    with pytest.raises(ValueError, match="shuffle=True"):
        build_loader(ds, batch_size=4, balance="class", shuffle=False)
    with pytest.raises(KeyError, match="did you mean 'class'"):
        build_loader(ds, batch_size=4, balance="clas")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        build_loader(ds, batch_size=0)
    with pytest.raises(ValueError, match="rank must be in"):
        build_loader(ds, batch_size=4, world_size=2, rank=2)


def test_augmentation_depends_only_on_seed_and_epoch(corpus):
    root, _ = corpus
    ds = CorpusDataset(root, transform=build_transform(GRAY_CFG, train=True))

    def epoch_batches(seed: int, workers: int, epochs: list[int]) -> list[torch.Tensor]:
        loader = build_loader(ds, batch_size=8, seed=seed, num_workers=workers)
        out = []
        for epoch in epochs:
            loader.sampler.set_epoch(epoch)
            out.append(torch.cat([images for images, _, _ in loader]))
        return out

    loader = build_loader(ds, batch_size=8, num_workers=2)
    assert loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
    main_0, main_1 = epoch_batches(0, 0, [0, 1])
    (workers_1,) = epoch_batches(0, 2, [1])  # fresh workers, started at epoch 1: a resumed run
    assert torch.equal(main_1, workers_1)  # same with or without workers, persistent or not
    assert not torch.equal(main_0, main_1)
    assert not torch.equal(main_0, epoch_batches(1, 0, [0])[0])
    # the caller's RNG stream is left as it was
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    ds[(0, 12345)]
    assert torch.equal(torch.rand(4), expected)


def test_labelled_dataset_from_source_items_converts_and_caches(shared_data):
    spec = SourceSpec(name="brain_yes_no", root=shared_data / "gray/targets/brain_mri_yes_no")
    items = list(itertools.islice(iter_source(spec), 0, 253, 25))  # 11 items, both labels
    with pytest.warns(UserWarning, match="to 1 channel"):  # some files of this set are RGB
        ds = LabelledDataset(items, channels=1, image_size=48)
    assert ds.images.shape == (11, 1, 48, 48) and ds.images.dtype == np.uint8
    assert ds.class_names == ["no", "yes"]
    assert [ds.class_names[i] for i in ds.labels] == [it.label for it in items]
    image, label = ds[3]
    assert torch.equal(image, torch.from_numpy(ds.images[3])) and label == ds.labels[3]
    assert ds.origins[0] == str(items[0].path)


def test_labelled_dataset_from_pairs_is_exact(shared_data):
    path = shared_data / "color/targets/bccd_wbc/BCCD_cropped/Basophil/BloodImage_00008_1.jpg"
    rgb = load_square(path, 32, 3).transpose(1, 2, 0)  # (32, 32, 3): already the target size
    gray = rgb[..., 1].copy()
    with pytest.warns(UserWarning, match="converted 1 of 2 images to 3 channel"):
        ds = LabelledDataset([(rgb, "basophil"), (gray, "other")], channels=3, image_size=32,
                             transform=build_transform({**GRAY_CFG, "input_size": (3, 32, 32)}, train=False))
    np.testing.assert_array_equal(ds.images[0], rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(ds.images[1], np.stack([gray] * 3))
    image, label = ds[0]
    torch.testing.assert_close(image, (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - 0.5) / 0.25)
    assert label == 0
    with pytest.raises(ValueError, match="not in class_names"):
        LabelledDataset([(gray, "x")], channels=1, image_size=32, class_names=["a", "b"])
    with pytest.raises(ValueError, match="has no label"):
        LabelledDataset([(gray, None)], channels=1, image_size=32)


def test_labelled_dataset_from_npz_rows_is_exact(shared_data):
    path = shared_data / "gray/targets/pneumoniamnist/pneumoniamnist.npz"
    spec = SourceSpec(name="pm", root=path.parent)
    items = list(itertools.islice(iter_source(spec), 0, None, 977))  # train and val rows, both labels
    ds = LabelledDataset(items, channels=1, image_size=28)  # MedMNIST rows are 28 x 28: no resize
    with np.load(path) as npz:
        expected = np.stack([npz[f"{it.frame[0]}_images"][it.frame[1]] for it in items])
        labels = [str(int(npz[f"{it.frame[0]}_labels"][it.frame[1]].item())) for it in items]
    np.testing.assert_array_equal(ds.images[:, 0], expected)
    assert [ds.class_names[i] for i in ds.labels] == labels
    assert ds.origins[1] == f"{path}#{items[1].frame[0]}/{items[1].frame[1]}"


def test_multiview_batches_through_getitems(corpus):
    root, _ = corpus
    ds = CorpusDataset(root, transform=build_multiview_transform(GRAY_CFG, views=2, crop_scale=(0.2, 1.0)))
    views, labels, _ = next(iter(build_loader(ds, batch_size=6, seed=0)))
    assert len(views) == 2 and views[0].shape == views[1].shape == (6, 1, 32, 32)
    assert not torch.equal(views[0], views[1])  # each view has its own seed
    first, _, _ = ds[(0, 99)]  # the per-image path gives views too
    assert len(first) == 2 and first[0].shape == (1, 32, 32)

"""Segmentation pairs from the real lgg_flair / kvasir_seg folders: reading, strata, joint augmentation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openmednet.data.segmentation import (
    SegmentationDataset,
    build_joint_transform,
    load_segmentation,
    mask_strata,
    read_classes,
    read_mask,
)


@pytest.fixture(scope="module")
def lgg(seg_subset, tmp_path_factory):
    return load_segmentation(seg_subset(tmp_path_factory.mktemp("lgg")))


def test_reads_real_pairs_with_mask_values_exactly(lgg, shared_data):
    assert read_classes(shared_data / "seg/gray/lgg_flair/classes.txt") == ("background", "flair_abnormality")
    assert lgg.channels == 1 and len(lgg) >= 12
    for image, mask, image_id in zip(lgg.images, lgg.masks, lgg.ids):
        stored = np.asarray(Image.open(lgg.root / image_id.replace("images/", "masks/").replace(".jpg", ".png")))
        np.testing.assert_array_equal(mask, stored)  # 256 px <= max_side: no resize, values untouched
        assert image.shape == mask.shape and image.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert all(g and g.startswith("TCGA_") for g in lgg.groups)


def test_strata_follow_the_masks(lgg):
    fractions = np.array([m.mean() for m in lgg.masks])
    strata = mask_strata(lgg.masks, lgg.class_names)
    np.testing.assert_array_equal(strata == "empty", fractions == 0)
    positive = fractions > 0
    median = np.median(fractions[positive])
    np.testing.assert_array_equal(strata[positive] == "flair_abnormality:large", fractions[positive] > median)
    sub = lgg.subset([0, 2])
    assert sub.ids == [lgg.ids[0], lgg.ids[2]] and list(sub.labels) == [lgg.labels[0], lgg.labels[2]]


def test_joint_augmentation_moves_mask_with_image_and_keeps_its_values(lgg):
    i = int(np.argmax([m.sum() for m in lgg.masks]))
    mask = lgg.masks[i]
    # The image is the mask itself (0/255): after the same geometric draw, both must still agree.
    image = (mask * 255).astype(np.uint8)
    tf = build_joint_transform((0.0,), (1.0,), 64)
    ds = SegmentationDataset([image], [mask], tf)
    for seed in range(6):
        x, m = ds[(0, seed)]
        assert x.shape == (1, 64, 64) and m.shape == (64, 64) and m.dtype == torch.int64
        assert set(m.unique().tolist()) <= {0, 1}  # nearest: no blended class values
        agree = ((x[0] > 0.5).long() == m).float().mean().item()
        assert agree > 0.97, f"seed {seed}: image and mask disagree on {1 - agree:.1%} of pixels"
        x2, m2 = ds[(0, seed)]
        assert torch.equal(x, x2) and torch.equal(m, m2)  # seeded per position: reproducible


def test_colour_set_and_bad_masks_are_refused_clearly(seg_subset, tmp_path):
    kv = load_segmentation(seg_subset(tmp_path / "kv", "color/kvasir_seg", patients=2, per_patient=3))
    assert kv.channels == 3 and kv.images[0].ndim == 3 and set(kv.given_splits) <= {"train", "val"}
    bad = tmp_path / "bad"
    seg_subset(bad, patients=1)
    rows = list(csv.DictReader((bad / "masks.csv").open()))
    wrong = np.asarray(Image.open(bad / rows[0]["mask"])) * 255  # a 0/255 mask
    Image.fromarray(wrong.astype(np.uint8)).save(bad / "m255.png")
    rows[0]["mask"] = "m255.png"
    with (bad / "masks.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "mask", "split", "group"])
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ValueError, match="map 255 to 1"):
        load_segmentation(bad)
    with pytest.raises(FileNotFoundError, match="masks.csv"):
        load_segmentation(tmp_path)


def test_masks_csv_from_excel_empty_or_latin1(seg_subset, tmp_path):
    # Regression: a byte-order mark (Excel's "CSV UTF-8") refused a valid manifest for a missing
    # 'path' column, and a header-only manifest was reported as missing both columns.
    data = seg_subset(tmp_path / "bom", patients=2, per_patient=3)
    text = (data / "masks.csv").read_text()
    plain = load_segmentation(data)
    (data / "masks.csv").write_text(text, encoding="utf-8-sig")
    bom = load_segmentation(data)
    assert bom.ids == plain.ids and all(np.array_equal(a, b) for a, b in zip(bom.masks, plain.masks))
    (data / "masks.csv").write_text(text.splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="masks.csv lists no image"):
        load_segmentation(data)
    (data / "masks.csv").write_bytes(text.encode() + "caf\xe9.jpg,m.png,,\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"masks.csv is not UTF-8 \(cannot decode byte 0xe9\)"):
        load_segmentation(data)


def _rewrite(folder, rows):
    with (folder / "masks.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "mask", "split", "group"])
        w.writeheader()
        w.writerows(rows)


def test_background_only_masks_and_classes_no_mask_holds_are_refused(seg_subset, tmp_path):
    """Regression (hostile-user probe): a set of empty masks trained to Dice 0.000 [0.000, 0.000] with
    only a warning about validation AUROC; a class of classes.txt in no mask was trained and scored
    (Dice 0), pulling dice_mean down. Both are refused now, as classification refuses a class
    without images."""
    data = seg_subset(tmp_path / "lgg", patients=2, per_patient=3)
    load_segmentation(data)
    (data / "classes.txt").write_text("0 background\n1 flair_abnormality\n2 necrosis\n")
    with pytest.raises(ValueError, match=r"classes.txt lists \['2 necrosis'\], which no mask contains"):
        load_segmentation(data)
    (data / "classes.txt").write_text("0 background\n1 flair_abnormality\n")
    rows = list(csv.DictReader((data / "masks.csv").open()))
    empty = np.zeros_like(np.asarray(Image.open(data / rows[0]["mask"])))
    Image.fromarray(empty).save(data / "empty.png")
    _rewrite(data, [{**r, "mask": "empty.png"} for r in rows])
    with pytest.raises(ValueError, match="no mask of .* has a foreground pixel"):
        load_segmentation(data)


def test_rows_outside_the_folder_are_skipped_as_for_labels_csv(seg_subset, shared_data, tmp_path):
    # Regression: masks.csv rows with absolute paths or ../ were read from anywhere (and trained on,
    # their paths written to per_image.csv); labels.csv rows outside their folder are skipped as
    # "outside_root" (data.sources.check_inside_root), and now masks.csv rows are too.
    data = seg_subset(tmp_path / "lgg", patients=2)
    rows = list(csv.DictReader((data / "masks.csv").open()))
    src = shared_data / "seg/gray/lgg_flair"
    inside = load_segmentation(data)
    escaped = [{**rows[0], "path": str(src / rows[0]["path"])},  # absolute, a real pair elsewhere
               {**rows[1], "mask": f"../{data.name}/../{data.name}2/{rows[1]['mask']}"},
               {**rows[2], "path": "../" * 12 + str(src / rows[2]["path"]).lstrip("/")}]
    (tmp_path / "lgg2" / "masks").mkdir(parents=True)
    (tmp_path / "lgg2" / rows[1]["mask"]).parent.mkdir(parents=True)
    (tmp_path / "lgg2" / rows[1]["mask"]).write_bytes((data / rows[1]["mask"]).read_bytes())
    (data / "images" / "link.jpg").symlink_to(src / rows[3]["path"])  # a link out of the folder
    escaped.append({**rows[3], "path": "images/link.jpg"})
    _rewrite(data, escaped + rows[4:])
    with pytest.warns(UserWarning, match=r"skipped 4 images \{'outside_root': 4\}"):
        kept = load_segmentation(data)
    assert len(rows) > 4 and kept.ids == inside.ids[4:] and kept.skipped == {"outside_root": 4}
    _rewrite(data, escaped)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"could be decoded \(\{'outside_root': 4\}\)"):
        load_segmentation(data)


def test_a_pair_listed_twice_is_used_once(seg_subset, tmp_path):
    # Regression (hostile-user probe): a masks.csv row listed twice was decoded, trained on and
    # counted twice; it is used once and reported as a "duplicate_row" skip, as in labels.csv.
    data = seg_subset(tmp_path / "lgg", patients=1)
    rows = list(csv.DictReader((data / "masks.csv").open()))
    once = load_segmentation(data)
    _rewrite(data, rows + [rows[0], {**rows[1], "path": f"./{rows[1]['path']}"}])
    with pytest.warns(UserWarning, match=r"skipped 2 images \{'duplicate_row': 2\}"):
        twice = load_segmentation(data)
    assert twice.ids == once.ids and twice.skipped == {"duplicate_row": 2} and once.skipped == {}
    assert len(twice) == len(rows) and twice.hashes.tolist() == once.hashes.tolist()
    # The same files by another path: absolute, through "..", a mask by its absolute path (the row's
    # text differs, the files do not; these were kept and trained on twice).
    first = Path(rows[0]["path"])
    again = [{**rows[0], "path": str((data / first).resolve())},
             {**rows[1], "path": f"{first.parts[0]}/../{rows[1]['path']}"},
             {**rows[-1], "mask": str((data / rows[-1]["mask"]).resolve())}]
    _rewrite(data, rows + again)
    with pytest.warns(UserWarning, match=r"skipped 3 images \{'duplicate_row': 3\}"):
        assert load_segmentation(data).ids == once.ids


def test_undecodable_odd_or_bomb_masks_are_one_clear_error(seg_subset, tmp_path):
    # Regression: a zero-byte, truncated or bomb-sized mask ended the run in a Pillow traceback
    # (UnidentifiedImageError, "image file is truncated", DecompressionBombError), and a 32-bit
    # mask's -1 "ignore" value wrapped to 255 and crashed the loss later.
    data = seg_subset(tmp_path / "lgg", patients=1)
    rows = list(csv.DictReader((data / "masks.csv").open()))
    mask_path = data / rows[0]["mask"]
    stored = np.asarray(Image.open(mask_path))
    h, w = stored.shape
    bad = {
        "empty.png": b"",
        "truncated.png": mask_path.read_bytes()[: mask_path.stat().st_size // 2],
    }
    for name, payload in bad.items():
        (data / name).write_bytes(payload)
    Image.new("1", (12000, 12000)).save(data / "bomb.png")  # 144 Mpx (Pillow only warns), a few kB on disk
    Image.new("1", (20000, 20000)).save(data / "bomb2.png")  # 400 Mpx: Pillow refuses
    negative = stored.astype(np.int32)
    negative[0, 0] = -1
    Image.fromarray(negative, mode="I").save(data / "negative.tif")
    big16 = stored.astype(np.uint16)
    Image.fromarray(big16).save(data / "sixteen.png")  # a 16-bit mask with class values is fine
    expected = {"empty.png": "cannot be decoded", "truncated.png": "cannot be decoded \\(image file is truncated",
                "bomb.png": "differ in size", "negative.tif": r"mask values \[-1\] are not classes"}
    for name, message in expected.items():
        _rewrite(data, [{**rows[0], "mask": name}] + rows[1:])
        with pytest.raises(ValueError, match=message):
            load_segmentation(data)
    with pytest.raises(ValueError, match="cannot be decoded.*exceeds limit"):
        read_mask(data / "bomb2.png", 2)  # no image size to compare with: Pillow's own limit
    _rewrite(data, [{**rows[0], "mask": "sixteen.png"}] + rows[1:])
    assert np.array_equal(load_segmentation(data).masks[0], stored) and (h, w) == stored.shape


def test_an_exif_turned_image_gets_its_mask_turned_alike(seg_subset, tmp_path):
    # Regression: the image reader turns an image upright by its EXIF orientation, the mask (no
    # EXIF) stayed as stored: a square pair silently labelled the wrong pixels. A mask drawn on the
    # stored pixels is now turned alike, one drawn on the upright image kept, a square one refused.
    data = seg_subset(tmp_path / "lgg", patients=1)
    rows = list(csv.DictReader((data / "masks.csv").open()))
    row = max(rows, key=lambda r: np.asarray(Image.open(data / r["mask"])).sum())  # most foreground
    image = np.asarray(Image.open(data / row["path"]).convert("L"))[:, :200]  # 256 x 200: not square
    mask = np.asarray(Image.open(data / row["mask"]))[:, :200]
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(image).save(data / "turned.png", exif=exif)  # PNG: the pixels stay exact
    Image.fromarray(mask).save(data / "stored_mask.png")
    Image.fromarray(np.rot90(mask, -1)).save(data / "upright_mask.png")
    for mask_name in ("stored_mask.png", "upright_mask.png"):
        _rewrite(data, [{**row, "path": "turned.png", "mask": mask_name}] + [r for r in rows if r is not row])
        pair = load_segmentation(data)
        i = pair.ids.index("turned.png")
        assert np.array_equal(pair.images[i], np.rot90(image, -1)), "the reader turns the image upright"
        assert np.array_equal(pair.masks[i], np.rot90(mask, -1)), mask_name
    square = np.asarray(Image.open(data / row["path"]).convert("L"))
    Image.fromarray(square).save(data / "turned_square.png", exif=exif)
    _rewrite(data, [{**row, "path": "turned_square.png"}] + [r for r in rows if r is not row])
    with pytest.raises(ValueError, match="EXIF orientation 6.*could be drawn either way"):
        load_segmentation(data)


def test_classes_txt_separated_by_tabs_or_spaces(tmp_path):
    """Regression (hostile-user probe): a tab-separated classes.txt was refused ("expected '0 <name>'")."""
    (tmp_path / "classes.txt").write_text("0\tbackground\n1  \tpolyp tissue\n")
    assert read_classes(tmp_path / "classes.txt") == ("background", "polyp tissue")
    (tmp_path / "classes.txt").write_text("0 background\n1\n")
    with pytest.raises(ValueError, match="expected '1 <name>'"):
        read_classes(tmp_path / "classes.txt")

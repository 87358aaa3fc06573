"""Segmentation transfer on real lgg_flair pairs: Dice/IoU by hand, shared splits and leakage
checks, encoder weights, and one tiny end-to-end run through ``openmednet finetune`` and a study."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from openmednet.data.segmentation import load_segmentation
from openmednet.eval.finetune import FinetuneConfig, prepare_splits
from openmednet.eval.metrics import bootstrap_resamples
from openmednet.eval.segmentation import (
    build_segmentation_model,
    load_segmentation_model,
    pixel_stats,
    segmentation_metrics,
    segmentation_scores,
)


@pytest.fixture(scope="module")
def lgg_dir(seg_subset, tmp_path_factory):
    return seg_subset(tmp_path_factory.mktemp("lgg"), patients=5)


@pytest.fixture(scope="module")
def lgg(lgg_dir):
    return load_segmentation(lgg_dir)


def test_dice_and_iou_of_a_real_mask_pair_by_hand(lgg):
    mask = lgg.masks[int(np.argmax([m.sum() for m in lgg.masks]))]
    pred = np.roll(mask, 5, axis=1)  # the same lesion, 5 px to the right
    tp = int(((pred == 1) & (mask == 1)).sum())
    fp = int(((pred == 1) & (mask == 0)).sum())
    fn = int(((pred == 0) & (mask == 1)).sum())
    stats = pixel_stats(torch.from_numpy(pred), torch.from_numpy(mask), 2)
    assert stats[:, 1].tolist() == [tp, fp, fn]
    empty = np.zeros_like(mask)  # an empty slice predicted empty: per-image Dice 1, no pixel counts
    both = np.stack([stats, pixel_stats(torch.from_numpy(empty), torch.from_numpy(empty), 2)])
    scores = segmentation_scores(both)
    assert scores["dice"][1] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=0)
    assert scores["iou"][1] == pytest.approx(tp / (tp + fp + fn), abs=0)
    assert scores["dice_image"][1] == pytest.approx((2 * tp / (2 * tp + fp + fn) + 1.0) / 2, abs=1e-15)
    assert scores["dice_mean"] == scores["dice"][1]  # one foreground class
    m = segmentation_metrics(both, ("background", "lesion"), n_boot=20, groups=["p1", "p1"])
    assert m["per_class"]["lesion"]["pixels"] == tp + fn and m["ci"]["_meta"]["n_boot"] == 20


def test_bootstrap_resamples_whole_patients(lgg):
    method, resamples = bootstrap_resamples(lgg.y, 30, seed=0, groups=lgg.groups)
    assert "cluster" in method
    members = {g: sorted(i for i, h in enumerate(lgg.groups) if h == g) for g in set(lgg.groups)}
    for idx in resamples:
        counts = {g: int(np.isin(idx, m).sum()) for g, m in members.items()}
        assert all(c % len(members[g]) == 0 for g, c in counts.items())  # whole patients only


def test_shared_splits_keep_patients_apart_and_drop_near_copies(lgg, lgg_dir, tmp_path):
    cfg = FinetuneConfig(data=lgg_dir, out=tmp_path / "x", task="segmentation", given_splits=False,
                         val_fraction=0.2, test_fraction=0.2)
    _, splits, dropped = prepare_splits(lgg, cfg)
    for g in set(lgg.groups):
        assert len({splits[i] for i, h in enumerate(lgg.groups) if h == g}) == 1, g
    # The first test slice listed again under another patient, in train: a near-copy, left out.
    rows = list(csv.DictReader((lgg_dir / "masks.csv").open()))
    test_row = rows[0]
    given = [{**r, "split": "test" if r["group"] == test_row["group"] else "train"} for r in rows]
    given += [{**test_row, "split": "train", "group": "copy"}]
    leaky = tmp_path / "leaky"
    shutil.copytree(lgg_dir, leaky)  # masks.csv rows outside their folder are skipped
    with (leaky / "masks.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "mask", "split", "group"])
        w.writeheader()
        w.writerows(given)
    target = load_segmentation(leaky)
    with pytest.warns(UserWarning, match="near-copies of test images"):
        cleaned, _, dropped = prepare_splits(target, FinetuneConfig(data=leaky, out=tmp_path / "y", task="segmentation",
                                                                    val_fraction=0.2))
    assert dropped["near_copies_of_test"] == [test_row["path"]] and len(cleaned) == len(target) - 1


def test_an_image_with_two_different_masks_is_left_out_whatever_their_strata(lgg, lgg_dir, tmp_path):
    """Regression (hostile-user probe): an image listed twice, with its mask and that mask mirrored, was
    trained on with both: conflicts were looked for among the size strata, and the two masks share
    one. Masks are compared now; the same mask under another file name is no conflict."""
    from PIL import Image

    rows = list(csv.DictReader((lgg_dir / "masks.csv").open()))
    sizes = [int(np.asarray(Image.open(lgg_dir / r["mask"])).sum()) for r in rows]
    twice, same = rows[int(np.argmax(sizes))], rows[int(np.argsort(sizes)[-2])]
    data = tmp_path / "two_masks"
    shutil.copytree(lgg_dir, data)
    mask = np.asarray(Image.open(lgg_dir / twice["mask"]))
    Image.fromarray(mask[:, ::-1].copy()).save(data / "masks" / "mirrored.png")  # same size, so same stratum
    shutil.copy(lgg_dir / same["mask"], data / "masks" / "same_again.png")
    with (data / "masks.csv").open("a", newline="") as f:
        csv.writer(f).writerows([[twice["path"], "masks/mirrored.png", twice.get("split", ""), twice["group"]],
                                 [same["path"], "masks/same_again.png", same.get("split", ""), same["group"]]])
    target = load_segmentation(data)
    assert len(target) == len(lgg) + 2
    conflicting = [i for i, name in enumerate(target.ids) if name == twice["path"]]
    assert len(set(target.labels[conflicting])) == 1  # one stratum: the old check saw no conflict
    cfg = FinetuneConfig(data=data, out=tmp_path / "x", task="segmentation", given_splits=False,
                         val_fraction=0.2, test_fraction=0.2)
    with pytest.warns(UserWarning, match="2 identical images carry different masks"):
        cleaned, _, dropped = prepare_splits(target, cfg)
    assert dropped["label_conflicts"] == [twice["path"]] * 2
    assert twice["path"] not in cleaned.ids and cleaned.ids.count(same["path"]) == 2


def test_encoder_starts_from_the_shipped_weights_exactly():
    from openmednet.models import create_model

    model, info = build_segmentation_model("mednet_gray", 2, 1)
    reference = create_model("mednet_gray", pretrained=True, features_only=True, out_indices=(0, 1, 2, 3, 4)).state_dict()
    state = model.encoder.model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert info["encoder"] == "tu-mednet_gray" and info["pretrained"]
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 1, 48, 48))


def test_finetune_cli_then_study_on_real_pairs(lgg_dir, tmp_path):
    from typer.testing import CliRunner

    from openmednet.cli.app import app
    from openmednet.config import load_config
    from openmednet.eval.study import StudyConfig, run_study

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", "--task", "segmentation", "--data", str(lgg_dir), "--init",
                                      "scratch:mednet_test", "--out", str(out), "--epochs", "1", "--image-size", "32",
                                      "--batch-size", "8", "--set", "n_boot=20"])
    assert result.exit_code == 0, result.output
    assert "dice_mean" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert set(test["per_class"]) == {"background", "flair_abnormality"} and "dice/flair_abnormality" in test["ci"]
    # metrics.json is recomputable from per_image.csv (pixel counts per test image and class)
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    stats = np.array([[[int(r[c]) for r in rows if r["id"] == i] for c in ("tp", "fp", "fn")]
                      for i in dict.fromkeys(r["id"] for r in rows)])
    assert len(stats) == test["n"] and segmentation_scores(stats)["dice_mean"] == test["dice_mean"]
    splits = list(csv.DictReader((out / "splits.csv").open()))
    assert len({(r["group"], r["split"]) for r in splits}) == len({r["group"] for r in splits})
    assert len(list((out / "predictions").rglob("*.png"))) == test["n"]
    assert (out / "plots" / "overlays.png").stat().st_size > 0
    model = load_segmentation_model(out / "model")
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)

    study = {"out": str(tmp_path / "study"), "task": "segmentation", "targets": [{"name": "lgg", "data": str(lgg_dir)}],
             "inits": ["scratch:mednet_test"], "seeds": [0], "finetune": {"epochs": 1, "image_size": 32, "batch_size": 8, "n_boot": 10}}
    (tmp_path / "study.yaml").write_text(json.dumps(study))
    with pytest.warns(UserWarning, match="seed"):
        report = run_study(load_config(StudyConfig, tmp_path / "study.yaml"))
    assert len(report["arms"]) == 1 and not report["failed"] and "dice_mean" in report["summary"][0]
    assert "Dice (foreground)" in (tmp_path / "study" / "report.md").read_text()


# Regression (review finding): without segmentation-models-pytorch the U-Net failed with a bare
# ModuleNotFoundError; now the error says how to install it.
def test_a_missing_segmentation_models_pytorch_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "segmentation_models_pytorch", None)  # "not installed"
    with pytest.raises(ImportError, match=r'pip install "segmentation-models-pytorch>=0.6"'):
        build_segmentation_model("scratch:mednet_test", 2, 1)
    with pytest.raises(ImportError, match="segmentation-models-pytorch"):
        pixel_stats(torch.zeros(4, 4), torch.zeros(4, 4), 2)


def test_a_too_large_budget_names_the_lesion_stratum_not_a_class(lgg, lgg_dir, tmp_path):
    # Regression: a segmentation per-class budget was refused as "class 'empty' has N training
    # images", though segmentation budgets are drawn per lesion stratum (empty / small / large).
    from openmednet.eval.finetune._data import _split_run

    cfg = FinetuneConfig(data=lgg_dir, out=tmp_path, task="segmentation", per_class=500, image_size=32)
    with pytest.raises(ValueError, match=r"stratum '\w+' has \d+ training images, fewer than per_class=500"):
        _split_run(cfg, lgg, tmp_path)

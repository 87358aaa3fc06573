"""End-to-end fine-tuning of mednet_test on real X-rays, and the bad-input cases of a target."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from openmednet import create_model
from openmednet.eval.finetune import (
    FinetuneConfig,
    build_init,
    check_input_contract,
    prepare_for_transfer,
    prepare_splits,
    run_finetune,
)
from openmednet.eval.metrics import bootstrap_ci, classification_metrics
from openmednet.eval.splits import check_group_leakage
from openmednet.eval.targets import load_target
from openmednet.models import load_pretrained, save_pretrained

OPENI = "gray/targets/openi_abd_vs_cxr"


def _rows(shared_data: Path, folder: str) -> list[dict[str, str]]:
    return list(csv.DictReader((shared_data / folder / "labels.csv").read_text().splitlines()))


def _write_labels(tmp: Path, rows: list[dict[str, str]], root: Path) -> Path:
    """A labels.csv in ``tmp`` over copies of real images (a few small files): a source's paths
    must stay inside its folder (``outside_root`` skip, issue 14 item 6)."""
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split", "group"])
        writer.writeheader()
        for r in rows:
            src = Path(r["path"]) if Path(r["path"]).is_absolute() else root / r["path"]
            rel = Path("images") / src.relative_to(src.anchor)
            if src.is_file():  # a missing path stays missing (test_missing_paths_are_listed)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / rel)
            writer.writerow({"path": rel.as_posix(), "label": r["label"], "split": r.get("split", ""), "group": r.get("group", "")})
    return tmp


def _openi_subset(shared_data: Path, tmp: Path, per_class: int = 20) -> Path:
    rows = [r for r in _rows(shared_data, OPENI) if r["split"] == "train"]
    chosen = [r for r in rows if r["label"] == "chest"][:per_class] + [r for r in rows if r["label"] == "abdomen"][:per_class]
    for r in chosen:
        r["split"] = ""  # let the run draw group-aware stratified splits
    return _write_labels(tmp / "openi40", chosen, shared_data / OPENI)


@pytest.fixture(scope="module")
def finetuned(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("finetune")
    cfg = FinetuneConfig(
        data=_openi_subset(shared_data, tmp), out=tmp / "run", init="scratch:mednet_test", epochs=2,
        patience=2, image_size=32, batch_size=8, lr=1e-3, n_boot=50, max_side=64,
    )
    result = run_finetune(cfg)
    return result.out, result.metrics


def test_finetune_writes_all_outputs(finetuned: tuple[Path, dict]) -> None:
    out, metrics = finetuned
    for name in ("config.yaml", "splits.csv", "history.json", "predictions.csv", "metrics.json",
                 "plots/learning_curves.png", "plots/confusion_matrix.png", "plots/roc.png",
                 "plots/reliability.png", "model/model.safetensors", "model/model_card.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == metrics["best_epoch"]
    assert metrics["epochs_run"] == len(json.loads((out / "history.json").read_text())) == 2
    assert metrics["data"]["counts"]["train_used"] == metrics["data"]["counts"]["train"]
    assert sum(sum(c.values()) for s, c in metrics["data"]["counts"].items() if s != "train_used") == 40


def test_metrics_are_recomputable_from_predictions(finetuned: tuple[Path, dict]) -> None:
    out, metrics = finetuned
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    names = metrics["data"]["label_names"]
    y = np.array([int(r["y"]) for r in rows])
    probs = np.array([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    saved = json.loads((out / "metrics.json").read_text())["test"]
    again = classification_metrics(y, probs, names)
    for key in ("auroc_macro", "balanced_accuracy", "accuracy", "f1_macro", "ece", "confusion_matrix", "per_class"):
        assert again[key] == saved[key], key
    assert bootstrap_ci(y, probs, n_boot=50, seed=0) == saved["ci"]


def test_test_split_is_untouched_and_group_disjoint(finetuned: tuple[Path, dict]) -> None:
    out, _ = finetuned
    rows = list(csv.DictReader((out / "splits.csv").read_text().splitlines()))
    splits = [r["split"] for r in rows]
    check_group_leakage([r["group"] for r in rows], splits)
    assert all(r["used_for_training"] == "0" for r in rows if r["split"] != "train")
    test_ids = {r["id"] for r in rows if r["split"] == "test"}
    assert test_ids == {r["id"] for r in csv.DictReader((out / "predictions.csv").read_text().splitlines())}
    assert {r["label"] for r in rows if r["split"] == "test"} == {"chest", "abdomen"}


def test_saved_model_carries_labels_and_contract(finetuned: tuple[Path, dict]) -> None:
    out, metrics = finetuned
    model = load_pretrained(out / "model")
    assert model.pretrained_cfg.label_names == ("abdomen", "chest")
    assert model.pretrained_cfg.input_size == (1, 32, 32)
    assert model.num_classes == 2
    card = json.loads((out / "model/model_card.json").read_text())
    assert card["metrics"]["auroc_macro"] == metrics["test"]["auroc_macro"]


# ----------------------------------------------------------------------------- bad input
def test_missing_paths_are_listed(shared_data: Path, tmp_path: Path) -> None:
    rows = _rows(shared_data, OPENI)[:6] + [{"path": "nowhere/ghost.jpg", "label": "chest"}]
    data = _write_labels(tmp_path, rows, shared_data / OPENI)
    with pytest.raises(FileNotFoundError, match=r"1 of 7 image paths .* do not exist \(e.g. .*ghost.jpg"):
        load_target(data)


@pytest.mark.parametrize("field", ["image_size", "max_side"])
def test_a_zero_size_is_refused_not_read_as_the_default(field: str) -> None:
    # Regression: --image-size 0 trained at the init's 64 px while config.yaml recorded 0.
    from openmednet.eval.finetune import FinetuneConfig

    with pytest.raises(ValueError, match=f"{field} must be >= 1 or unset"):
        FinetuneConfig(data="d", out="o", **{field: 0})
    assert FinetuneConfig(data="d", out="o", image_size=None).image_size is None


def _finished(out: Path, cfg) -> None:
    """``out`` as a run of ``cfg`` that finished (its metrics.json, with the precision it resolved to)."""
    from openmednet.config import to_dict

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"config": to_dict(cfg), "model": {"precision": "fp32",
                                                                                    "channels_last": False}}))
    (out / "config.yaml").write_text("the finished run's config\n")


def test_a_rerun_with_other_settings_is_refused_and_overwrites_nothing(tmp_path: Path) -> None:
    # Regression: a re-run into a finished run's folder rewrote config.yaml and then, when it failed
    # (e.g. --per-class too large), left the old metrics.json and model beside the new config: a
    # "finished" run that never ran. Another configuration is now refused before anything is written.
    from openmednet.eval.finetune import FinetuneConfig
    from openmednet.eval.finetune._outputs import start_run

    out = tmp_path / "run"
    _finished(out, FinetuneConfig(data="d", out=out, precision="fp32", device="cpu"))
    with pytest.raises(ValueError, match=r"a different configuration \(per_class: None -> 50\); nothing was overwritten"):
        start_run(FinetuneConfig(data="d", out=out, per_class=50, precision="fp32", device="cpu"))
    assert (out / "metrics.json").is_file() and (out / "config.yaml").read_text() == "the finished run's config\n"
    # Another semi method: the method is the difference, not the settings only one of them reads
    # (the hostile-user probe saw 9 fields listed, 7 of them defaults never set).
    with pytest.raises(ValueError, match=r"configuration \(semi: 'none' -> 'fixmatch'\); "):
        start_run(FinetuneConfig(data="d", out=out, semi="fixmatch", unlabelled=("u",), precision="fp32", device="cpu"))


def test_the_same_run_is_redone_and_more_rounds_continue(tmp_path: Path, caplog) -> None:
    from openmednet.eval.finetune import FinetuneConfig
    from openmednet.eval.finetune._outputs import start_run

    out = tmp_path / "run"
    same = dict(data="d", precision="fp32", semi="pseudo_label", unlabelled=("rest_of_train",), device="cpu")
    _finished(out, FinetuneConfig(out=tmp_path / "moved", num_workers=2, rounds=1, **same))  # neutral fields differ
    with caplog.at_level("WARNING"):
        start_run(FinetuneConfig(out=out, rounds=3, **same))
    assert not (out / "metrics.json").exists() and "rounds: 3" in (out / "config.yaml").read_text()
    assert "finished run of this configuration: it is redone" in caplog.text


def test_a_segmentation_folder_is_not_classified(seg_subset, tmp_path: Path) -> None:
    # Regression: its images/ and masks/ sub-folders were read as two classes and a run "succeeded".
    data = seg_subset(tmp_path / "seg", patients=2, per_patient=3)
    with pytest.raises(ValueError, match="is a segmentation folder \\(masks.csv\\): use --task segmentation"):
        load_target(data)


def test_unknown_labels_and_single_image_class(shared_data: Path, tmp_path: Path) -> None:
    rows = _rows(shared_data, OPENI)[:8]
    data = _write_labels(tmp_path, rows, shared_data / OPENI)
    with pytest.raises(ValueError, match=r"labels \['chest'\] are not among the expected classes .*did you mean 'chests'"):
        load_target(data, classes=("abdomen", "chests"))
    rows[0] = {**rows[0], "label": "pelvis"}
    _write_labels(tmp_path, rows, shared_data / OPENI)
    with pytest.raises(ValueError, match=r"\['pelvis'\] have a single image"):
        load_target(data)


def test_near_copy_of_a_test_image_is_dropped_or_refused(shared_data: Path, tmp_path: Path) -> None:
    rows = [r for r in _rows(shared_data, OPENI) if r["split"] in ("train", "val")]
    rows = [r for r in rows if r["label"] == "chest"][:15] + [r for r in rows if r["label"] == "abdomen"][:15]
    rows += [{**rows[0], "split": "test"}, {**rows[-1], "split": "test"}]  # same files, now also in test
    data = _write_labels(tmp_path, rows, shared_data / OPENI)
    target = load_target(data, max_side=64)
    cfg = FinetuneConfig(data=data, out=tmp_path / "run")
    with pytest.warns(UserWarning, match="near-copies of test images"):
        cleaned, splits, dropped = prepare_splits(target, cfg)
    assert len(dropped["near_copies_of_test"]) >= 2
    assert len(cleaned) == len(target) - len(dropped["near_copies_of_test"])
    assert (splits == "test").sum() == 2
    with pytest.raises(ValueError, match="near-copies of test images"):
        prepare_splits(target, FinetuneConfig(data=data, out=tmp_path / "run", leakage="error"))


def test_busi_double_label_is_dropped(shared_data: Path, tmp_path: Path) -> None:
    busi = _rows(shared_data, "gray/targets/busi")
    pick = [r for r in busi if r["label"] == "benign"][:12] + [r for r in busi if r["label"] == "malignant"][:12]
    pick += [r for r in busi if r["path"].endswith(("benign (433).jpg", "malignant (145).jpg"))]
    data = _write_labels(tmp_path, pick, shared_data / "gray/targets/busi")
    target = load_target(data, max_side=64)
    with pytest.warns(UserWarning, match="different labels"):
        cleaned, _, dropped = prepare_splits(target, FinetuneConfig(data=data, out=tmp_path / "run"))
    assert sorted(Path(p).name for p in dropped["label_conflicts"]) == ["benign (433).jpg", "malignant (145).jpg"]
    assert len(cleaned) == len(target) - 2


def test_a_row_listed_twice_is_used_once_and_two_labels_are_both_dropped(shared_data: Path, tmp_path: Path) -> None:
    # Regression (hostile-user probe): a labels.csv row listed twice was decoded, trained on and
    # counted twice; it is used once and reported as a "duplicate_row" skip (as "outside_root" is).
    rows = [r for r in _rows(shared_data, OPENI) if r["split"] == "train"]
    rows = [r for r in rows if r["label"] == "chest"][:6] + [r for r in rows if r["label"] == "abdomen"][:6]
    rows = [{**r, "split": ""} for r in rows]
    once = load_target(_write_labels(tmp_path / "once", rows, shared_data / OPENI), max_side=64)
    with pytest.warns(UserWarning, match=r"skipped 2 images \{'duplicate_row': 2\}"):
        twice = load_target(_write_labels(tmp_path / "twice", rows + [rows[0], rows[-1]], shared_data / OPENI), max_side=64)
    assert twice.ids == once.ids and twice.hashes.tolist() == once.hashes.tolist()
    assert (twice.skipped, once.skipped) == ({"duplicate_row": 2}, {})
    # The same file by another path (absolute, through "..", "./"): the row's text differs, the file
    # does not; these were kept, so one image was trained on twice (or sat in train and test).
    data = _write_labels(tmp_path / "paths", rows, shared_data / OPENI)
    first, second, third = (Path(r["path"]) for r in list(csv.DictReader((data / "labels.csv").open()))[:3])
    with open(data / "labels.csv", "a", newline="") as f:
        csv.writer(f).writerows([[str((data / first).resolve()), rows[0]["label"], "", ""],
                                 [f"{second.parts[0]}/../{second}", rows[1]["label"], "", ""],
                                 [f"./{third}", rows[2]["label"], "", ""]])
    with pytest.warns(UserWarning, match=r"skipped 3 images \{'duplicate_row': 3\}"):
        assert load_target(data, max_side=64).hashes.tolist() == once.hashes.tolist()
    # The same path with another label is one image with two labels (busi's trap): no label is
    # picked, both rows stay for prepare_splits, which leaves the image out.
    data = _write_labels(tmp_path / "both", rows + [{**rows[0], "label": "abdomen"}], shared_data / OPENI)
    target = load_target(data, max_side=64)
    assert len(target) == len(rows) + 1 and target.skipped == {}
    with pytest.warns(UserWarning, match="different labels"):
        cleaned, _, dropped = prepare_splits(target, FinetuneConfig(data=data, out=tmp_path / "run"))
    assert dropped["label_conflicts"] == [once.ids[0]] * 2 and once.ids[0] not in cleaned.ids


def test_init_from_saved_weights_and_contract_checks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model("mednet_test", num_classes=5)
    save_pretrained(source, tmp_path / "w")
    model, info = build_init(str(tmp_path / "w"), num_classes=2, data_channels=1)
    assert torch.equal(model.stem.conv1.conv.weight, source.stem.conv1.conv.weight)
    assert model.num_classes == 2 and info["architecture"] == "mednet_test"
    with pytest.raises(ValueError, match="bare weights file"):
        build_init(str(tmp_path / "w/model.safetensors"), 2, 1)
    bare, _ = build_init(str(tmp_path / "w/model.safetensors"), 2, 1, arch="mednet_test")
    assert torch.equal(bare.stem.conv1.conv.weight, source.stem.conv1.conv.weight)
    with pytest.raises(FileNotFoundError, match="init weights not found"):
        build_init(str(tmp_path / "nothing/here.safetensors"), 2, 1)
    with pytest.raises(KeyError, match="no pretrained weights .* use init='scratch:mednet_test'"):
        build_init("mednet_test", 2, 1)
    with pytest.raises(KeyError, match="did you mean 'mednet_test'"):
        build_init("scratch:mednet_tset", 2, 1)
    with pytest.warns(UserWarning, match="colour is lost"):
        assert check_input_contract(model, data_channels=3, image_size=48) == (1, 48)
    with pytest.raises(ValueError, match="below the model's minimum 17"):
        check_input_contract(model, data_channels=1, image_size=16)


def test_prepare_for_transfer_resets_timm_head_and_bn_momentum() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=2)  # timm TF port: head +-1/sqrt(2), BN momentum 0.01
    assert model.classifier.weight.abs().max() > 0.1
    info = prepare_for_transfer(model)
    bound = 1 / model.classifier.in_features ** 0.5
    assert info == {"head_reset": 1, "bn_momentum": 0.1}
    assert model.classifier.weight.abs().max() <= bound
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}


def test_load_target_from_npz_keeps_official_splits(shared_data: Path) -> None:
    target = load_target(shared_data / "gray/targets/pneumoniamnist/pneumoniamnist.npz",
                         label_map={"0": "normal", "1": "pneumonia"})
    assert len(target) == 5856 and target.label_names == ("normal", "pneumonia")
    assert target.ids[0] == "pneumoniamnist.npz#train/0" and target.images[0].shape == (28, 28)
    splits = Counter(target.given_splits)
    assert splits == {"train": 4708, "val": 524, "test": 624}
    _, drawn, dropped = prepare_splits(target, FinetuneConfig(data="unused", out="unused"))
    assert Counter(drawn) == splits and dropped == {"label_conflicts": [], "near_copies_of_test": []}


def test_load_target_from_another_csv(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / OPENI
    rows = [r for r in _rows(shared_data, OPENI) if r["split"] == "train"]
    rows = rows[:5] + rows[-5:]  # both classes
    for r in rows:  # copies: a source's paths must stay inside its folder (issue 14 item 6)
        shutil.copyfile(root / r["path"], tmp_path / Path(r["path"]).name)
    (tmp_path / "meta.csv").write_text(
        "image_id,dx,patient\n" + "".join(f"{Path(r['path']).name},{r['label']},p{i // 2}\n" for i, r in enumerate(rows))
    )
    target = load_target(tmp_path, format="csv", csv_file="meta.csv",
                         columns={"path": "image_id", "label": "dx", "group": "patient"})
    assert list(target.labels) == [r["label"] for r in rows]
    assert target.groups[:4] == ["p0", "p0", "p1", "p1"]


def test_a_few_colour_files_do_not_turn_a_gray_target_colour(shared_data: Path) -> None:
    # brain_mri_yes_no: 30 of its 253 MRI files are not gray within 3 levels (colour marks, tints); the target stays gray.
    with pytest.warns(UserWarning, match=r"30 of 253 images have colour content; they are converted to 1 channel"):
        target = load_target(shared_data / "gray/targets/brain_mri_yes_no", max_side=64)
    assert target.channels == 1
    assert all(a.ndim == 2 for a in target.images)


def test_a_run_is_the_same_with_or_without_loader_workers(
    shared_data: Path, tmp_path: Path, finetuned: tuple[Path, dict]
) -> None:
    # Order and augmentation come from (seed, epoch, position) via build_loader, not from which
    # process decodes a batch: 2 workers must reproduce the in-process run of the fixture exactly.
    out, metrics = finetuned
    cfg = FinetuneConfig(
        data=_openi_subset(shared_data, tmp_path), out=tmp_path / "run", init="scratch:mednet_test", epochs=2,
        patience=2, image_size=32, batch_size=8, lr=1e-3, n_boot=50, max_side=64, num_workers=2,
    )
    torch.manual_seed(0)
    again = run_finetune(cfg)
    assert json.loads((again.out / "history.json").read_text()) == json.loads((out / "history.json").read_text())
    assert (again.out / "predictions.csv").read_text() == (out / "predictions.csv").read_text()


def test_bf16_channels_last_training_runs_and_evaluates_in_fp32(shared_data: Path, tmp_path: Path) -> None:
    cfg = FinetuneConfig(
        data=_openi_subset(shared_data, tmp_path, per_class=8), out=tmp_path / "run", init="scratch:mednet_test",
        epochs=1, patience=1, image_size=28, batch_size=8, n_boot=0, max_side=64, precision="bf16",
        channels_last=True,
    )
    metrics = run_finetune(cfg).metrics
    assert metrics["model"]["input_size"] == [1, 28, 28]  # MedMNIST's native size is accepted
    probs = np.loadtxt(tmp_path / "run/predictions.csv", delimiter=",", skiprows=1, usecols=(3, 4))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)  # fp32 softmax in float64, not bf16


@pytest.mark.parametrize("init, error", [("scratch:", ValueError), ("imagenet:resnet50", ValueError),
                                         ("runs/no_such_run/backbone", FileNotFoundError)])
def test_a_bad_init_fails_before_the_data_is_read(init, error, tmp_path: Path, monkeypatch) -> None:
    # Regression: a malformed or missing --init was refused only after the target was decoded
    # (minutes on a large folder), and after the run folder was created.
    import openmednet.eval.finetune as ft
    from openmednet.eval.finetune import FinetuneConfig

    monkeypatch.setattr(ft, "load_target", lambda *a, **k: pytest.fail("the data was read before the init was checked"))
    with pytest.raises(error):
        ft.run_finetune(FinetuneConfig(data=tmp_path, out=tmp_path / "run", init=init))
    assert not (tmp_path / "run").exists()


def test_a_run_or_study_folder_inside_the_target_folder_is_refused(tmp_path: Path) -> None:
    # Regression (hostile-user probe): 'finetune --data D --out D/run' on a class-folder target put
    # the run's plots in D/run, so the next run on D had a third class 'run' made of PNG plots.
    from openmednet.eval.study import StudyConfig, _check_grid

    data = tmp_path / "d"
    (data / "a").mkdir(parents=True)
    for out in (data / "run", data):
        with pytest.raises(ValueError, match="is (inside )?the target folder .*give a folder outside it"):
            run_finetune(FinetuneConfig(data=data, out=out, init="scratch:mednet_test"))
    assert sorted(p.name for p in data.iterdir()) == ["a"]
    with pytest.raises(ValueError, match="study out .* is inside the target folder"):
        _check_grid(StudyConfig(out=data / "study", targets=({"name": "d", "data": str(data)},), inits=("auto",)))


def test_labels_that_differ_only_in_case_are_warned(shared_data: Path, tmp_path: Path) -> None:
    # Regression (hostile-user probe): 'yes' and 'Yes' in a hand-typed labels.csv made a 3-class
    # target without a word. Still separate classes (a source may mean them apart), but said.
    rows = [{**r, "split": ""} for r in _rows(shared_data, OPENI) if r["split"] == "train"]
    rows = [r for r in rows if r["label"] == "chest"][:6] + [r for r in rows if r["label"] == "abdomen"][:6]
    rows = [{**r, "label": "Chest"} if i < 2 else r for i, r in enumerate(rows)]
    with pytest.warns(UserWarning, match=r"differ only in case are separate classes: 'Chest' \(2\) / 'chest' \(4\)"):
        target = load_target(_write_labels(tmp_path / "t", rows, shared_data / OPENI), max_side=64)
    assert target.label_names == ("Chest", "abdomen", "chest")


def test_a_run_folder_inside_a_manifest_target_is_allowed(tmp_path: Path) -> None:
    # labels.csv lists the files a run reads, so its plots in data/runs/... never become images
    from openmednet.eval.finetune._outputs import check_out_outside_data

    data = tmp_path / "project"
    data.mkdir()
    (data / "labels.csv").write_text("path,label,split,group\n")
    check_out_outside_data(data / "runs" / "x", data)  # no error
    (data / "labels.csv").unlink()
    with pytest.raises(ValueError, match="inside the target folder"):
        check_out_outside_data(data / "runs" / "x", data)

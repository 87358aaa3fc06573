"""Semi-supervised fine-tuning (issue 12): pseudo-label selection, leakage of unlabelled images,
resume of multi-round runs, FixMatch end to end and the CLI errors, on a tiny real brain MRI target."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from openmednet.cli.app import app
from openmednet.data.semi import StrongAugment, UnlabelledDataset
from openmednet.data.transforms import build_transform
from openmednet.eval import finetune as ft
from openmednet.eval.finetune import FinetuneConfig, prepare_splits, run_finetune
from openmednet.eval.semi import gather_unlabelled, select_pseudo_labels
from openmednet.eval.targets import load_target

@pytest.fixture(scope="module")
def tiny(brain_subset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 24-image labelled target (12 per class, drawn splits) and a folder of 10 other images of the set."""
    return brain_subset(tmp_path_factory.mktemp("semi"))


def _cfg(data: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(data=data, out=out, init="scratch:mednet_test", epochs=1, patience=1, image_size=32, batch_size=8,
                lr=1e-3, n_boot=0, max_side=64, given_splits=False, test_fraction=0.25, per_class=3)
    return FinetuneConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------ selection
def _probs(n_major: int, n_minor: int, conf: float = 0.99) -> np.ndarray:
    p = np.full((n_major + n_minor, 2), 1 - conf)
    p[:n_major, 0] = conf
    p[n_major:, 1] = conf
    return p


def test_threshold_keeps_confident_predictions_only() -> None:
    probs = np.array([[0.96, 0.04], [0.95, 0.05], [0.94, 0.06], [0.10, 0.90], [0.02, 0.98]])
    idx, labels, info = select_pseudo_labels(probs, threshold=0.95, selection="threshold")
    assert idx.tolist() == [0, 1, 4] and labels.tolist() == [0, 0, 1]  # the threshold itself is kept
    assert info["confident_per_class"] == [2, 1] and info["threshold_per_class"] == [0.95, 0.95]


def test_class_balanced_selection_stops_a_majority_class_swallowing_the_rest() -> None:
    probs = _probs(90, 5)
    probs[:90, 0] -= np.linspace(0, 0.03, 90)  # distinct confidences: the most confident are kept
    probs[:90, 1] = 1 - probs[:90, 0]
    _, labels, _ = select_pseudo_labels(probs, threshold=0.9, selection="threshold")
    assert np.bincount(labels).tolist() == [90, 5]
    idx, labels, info = select_pseudo_labels(probs, threshold=0.9, selection="class_balanced")
    assert np.bincount(labels).tolist() == [5, 5] and info["kept_per_class"] == [5, 5]
    assert set(idx[labels == 0].tolist()) == {0, 1, 2, 3, 4}
    # No confident minority prediction: nothing is kept rather than majority-only pseudo labels.
    idx, _, info = select_pseudo_labels(_probs(90, 5, conf=0.6), threshold=0.9, selection="class_balanced")
    assert idx.size == 0 and info["confident_per_class"] == [0, 0]


def test_per_class_threshold_keeps_the_top_fraction_of_each_class() -> None:
    probs = np.concatenate([_probs(8, 0, conf=0.99), _probs(0, 4, conf=0.7)])
    probs[8:, 1] = [0.55, 0.6, 0.7, 0.8]
    probs[8:, 0] = 1 - probs[8:, 1]
    idx, labels, info = select_pseudo_labels(probs, threshold=0.95, selection="per_class_threshold", fraction=0.5)
    assert np.bincount(labels).tolist() == [4, 2]
    assert sorted(idx[labels == 1].tolist()) == [10, 11]  # the minority's 2 most confident, below 0.95
    assert info["threshold_per_class"][1] == pytest.approx(0.7)


def test_strong_augment_is_seeded_and_keeps_gray_gray() -> None:
    base = build_transform({"input_size": (3, 32, 32), "mean": (0.5,), "std": (0.25,)}, train=True, augment="gray")
    strong = StrongAugment(base)
    gray = torch.randint(0, 255, (4, 1, 40, 40), dtype=torch.uint8).repeat(1, 3, 1, 1)
    a, b = strong.batch(gray, [1, 2, 3, 4]), strong.batch(gray, [1, 2, 3, 4])
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)
    assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 1], a[:, 2])
    ds = UnlabelledDataset([np.zeros((50, 40), np.uint8)] * 3, channels=1, image_size=32, transform=strong)
    assert [y for _, y in ds.__getitems__([(0, 5), (1, 6)])] == [-1, -1]


# ------------------------------------------------------------------------------------ leakage
def _unlabelled_folder(tiny: tuple[Path, Path], tmp_path: Path, name: str):
    """A folder of the 10 extra images as a FixMatch run's unlabelled source, that run's config, and
    its cleaned target and splits (for the tests to add copies of held-out images to the folder)."""
    data, extra = tiny
    folder = tmp_path / name
    folder.mkdir()
    for p in extra.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    cfg = _cfg(data, tmp_path / "run", semi="fixmatch", unlabelled=(str(folder),), semi_threshold=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target, splits, _ = prepare_splits(load_target(data, max_side=64), cfg)
    return folder, cfg, target, splits


def test_unlabelled_near_copies_of_test_images_are_dropped_and_counted(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    folder, cfg, target, splits = _unlabelled_folder(tiny, tmp_path, "with_copies")
    test = np.flatnonzero(splits == "test")[:2]
    for i in test:  # near-copies: resized and re-encoded as JPEG
        img = Image.fromarray(target.images[i])
        img.resize((img.width - 3, img.height - 2)).save(folder / f"copy_{i}.jpg", quality=85)

    with pytest.raises(ValueError, match="2 unlabelled images are near-copies of test images"):
        gather_unlabelled(FinetuneConfig(**{**cfg.__dict__, "leakage": "error"}), target, splits, np.flatnonzero(splits == "train"))
    metrics = run_finetune(cfg).metrics  # FixMatch end to end
    unl = metrics["semi"]["unlabelled"]
    assert sorted(unl["dropped"]["near_copies_of_test"]) == sorted(f"with_copies/copy_{i}.jpg" for i in test)
    assert unl["n_found"] == 12 and unl["n_used"] == 10
    assert metrics["semi"]["method"] == "fixmatch" and metrics["semi"]["unlabelled_seen"] >= 10
    assert sum(metrics["data"]["counts"]["train_used"].values()) == 6  # labels: the budget only
    assert json.loads((tmp_path / "run/metrics.json").read_text())["semi"]["unlabelled"] == unl


def test_unlabelled_folder_holding_the_validation_images_is_cleaned_of_them(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """A folder given as unlabelled may be the target itself: its validation images would be trained on
    (without labels) and then used for model choice. They are dropped as near-copies of validation
    images and counted apart from the test ones; rest_of_train is held to the test rule only."""
    folder, cfg, target, splits = _unlabelled_folder(tiny, tmp_path, "with_val")
    val, test = np.flatnonzero(splits == "val")[:2], np.flatnonzero(splits == "test")[:1]
    for i in (*val, *test):  # the held-out images themselves, as a copy of the target folder holds them
        Image.fromarray(target.images[i]).save(folder / f"held_out_{i}.png")
    train = np.flatnonzero(splits == "train")

    with pytest.warns(UserWarning, match="near-copies of validation images") as caught:
        unl, info = gather_unlabelled(cfg, target, splits, train)
    assert sorted(info["dropped"]["near_copies_of_val"]) == sorted(f"with_val/held_out_{i}.png" for i in val)
    assert info["dropped"]["near_copies_of_test"] == [f"with_val/held_out_{test[0]}.png"]
    assert info["n_found"] == 13 and len(unl) == 10 and not any("held_out" in i for i in unl.ids)
    assert any("model choice" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="2 unlabelled images are near-copies of validation images"):
        gather_unlabelled(FinetuneConfig(**{**cfg.__dict__, "leakage": "error"}), target, splits, train)

    rest = FinetuneConfig(**{**cfg.__dict__, "unlabelled": ("rest_of_train",), "per_class": 3})
    _, info = gather_unlabelled(rest, target, splits, train[:6])
    assert list(info["dropped"]) == ["near_copies_of_test"]


def test_a_segmentation_folder_gives_its_images_not_its_masks(seg_subset, tmp_path: Path) -> None:
    """Regression (hostile-user probe): ``--unlabelled`` on a segmentation folder read ``images/`` and
    ``masks/`` as two class folders, so the 0/1 masks became unlabelled "images"."""
    import csv

    from openmednet.eval.unlabelled import check_unlabelled, load_unlabelled

    folder = seg_subset(tmp_path / "lgg", patients=2)
    rows = list(csv.DictReader((folder / "masks.csv").open()))
    check_unlabelled([folder])
    unl = load_unlabelled([folder], channels=1)
    assert sorted(unl.ids) == sorted(f"lgg/{r['path']}" for r in rows)
    assert unl.labels_hidden == 0 and not any("mask" in i for i in unl.ids)
    first = np.asarray(Image.open(folder / rows[0]["path"]).convert("L"))
    i = unl.ids.index(f"lgg/{rows[0]['path']}")
    np.testing.assert_array_equal(unl.images[i], first)  # the image itself, decoded as any image is


# ------------------------------------------------------------------------------------ rounds
def test_multi_round_run_resumes_and_extends_with_the_same_result(tiny: tuple[Path, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = tiny
    kw = dict(semi="pseudo_label", unlabelled=("rest_of_train",), pseudo_selection="per_class_threshold")
    full = run_finetune(_cfg(data, tmp_path / "full", rounds=2, **kw)).metrics
    rounds = full["semi"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and [r["teacher"] for r in rounds] == [None, "round0", "round1"]
    assert all(sum(r["pseudo"]["kept_per_class"].values()) == r["pseudo"]["n_kept"] > 0 for r in rounds[1:])
    assert full["val"]["auroc_macro"] == rounds[full["semi"]["chosen_round"]]["val_auroc"]
    assert full["semi"]["unlabelled"]["sources"] == ["rest_of_train"]

    trained = []
    real_train = ft._train
    monkeypatch.setattr(ft, "_train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    run_finetune(_cfg(data, tmp_path / "part", rounds=1, **kw))
    assert len(trained) == 2
    (tmp_path / "part/semi/round1/round.json").unlink()  # as if killed while saving round 1
    resumed = run_finetune(_cfg(data, tmp_path / "part", rounds=2, **kw)).metrics
    assert len(trained) == 4  # round 0 reused; rounds 1 and 2 trained
    assert resumed["semi"]["rounds"] == rounds
    assert resumed["test"]["auroc_macro"] == full["test"]["auroc_macro"]
    with pytest.raises(ValueError, match="different configuration"):
        run_finetune(_cfg(data, tmp_path / "part", rounds=2, **{**kw, "pseudo_fraction": 0.6}))


# ------------------------------------------------------------------------------------ CLI errors
def _cli(data: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["finetune", "--data", str(data), "--out", str(out), "--init", "scratch:mednet_test",
                                    "--epochs", "1", "--image-size", "32", "--per-class", "3", "--semi", "fixmatch",
                                    "--set", "given_splits=false", "--set", "max_side=64", *extra])


def test_cli_errors_name_the_unlabelled_problem(tiny: tuple[Path, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    cases = {
        (): "needs unlabelled images",
        ("--unlabelled", str(tmp_path / "missing")): "does not exist",
        ("--unlabelled", str(empty)): "no unlabelled images found in",
        ("--unlabelled", str(broken)): "could not be decoded",
        ("--unlabelled", "rest_of_train", "--unlabelled", str(broken)): "cannot be combined",
        ("--unlabelled", str(broken / "a.png")): "is a file; give a folder of images",
    }
    for args, message in cases.items():
        result = _cli(data, tmp_path / "run", *args)
        assert result.exit_code != 0 and message in str(result.exception), (args, result.exception)
        assert not (tmp_path / "run").exists(), args  # refused before the run wrote anything
    monkeypatch.setattr("openmednet.eval.unlabelled.os.access", lambda path, mode: Path(path) != empty)
    result = _cli(data, tmp_path / "run", "--unlabelled", str(empty))
    assert "permission denied" in str(result.exception)


def test_settings_the_chosen_method_ignores_are_named(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Regression (hostile-user probe): ``--semi fixmatch --set sat_momentum=0.5`` ran without a word,
    as if FreeMatch's setting applied. Single runs and studies now name what their methods ignore."""
    from openmednet.eval import study
    from openmednet.eval.semi import unread_semi_settings

    data, _ = tiny
    empty = tmp_path / "empty"
    empty.mkdir()  # the run stops at its unlabelled folder, after the settings were checked
    result = _cli(data, tmp_path / "run", "--unlabelled", str(empty), "--set", "sat_momentum=0.5", "--set", "rounds=3")
    assert "warning: ignored settings: semi=fixmatch does not read rounds (pseudo_label); sat_momentum (freematch)" \
        in result.output
    result = _cli(data, tmp_path / "run", "--unlabelled", str(empty), "--set", "semi_threshold=0.9")
    assert "ignored settings" not in result.output  # fixmatch reads its threshold

    changed = FinetuneConfig(data=data, out=tmp_path / "x", lambda_f=0.1, mu=3)
    assert unread_semi_settings(changed, ["freematch"]) == []
    assert unread_semi_settings(changed, ["none"]) == ["mu", "lambda_f"]
    assert unread_semi_settings(FinetuneConfig(data=data, out=tmp_path / "x"), ["none"]) == []  # defaults: not a choice
    cfg = study.StudyConfig(out=tmp_path / "s", targets=(), inits=("auto",), semi=("none", "fixmatch"),
                            unlabelled=("rest_of_train",), finetune={"rounds": 2, "mu": 3})
    with pytest.warns(UserWarning, match=r"semi=none/fixmatch does not read rounds \(pseudo_label\)"):
        study._warn_unread_semi_settings(cfg)


# ------------------------------------------------------------------------------------ study
def test_study_semi_axis_maps_arms_and_keeps_earlier_runs_reusable(tmp_path: Path) -> None:
    from openmednet.config import to_dict
    from openmednet.eval import study
    from openmednet.eval.semi import SEMI_FIELDS, has_unlabelled, study_strategies

    cfg = study.StudyConfig(out=tmp_path / "out", targets=({"name": "t", "data": str(tmp_path / "t")},),
                            inits=("auto",), semi=("none", "fixmatch"), unlabelled=("rest_of_train",), per_class=(10,))
    study._check_grid(cfg)
    assert study_strategies(cfg.strategies, cfg.semi) == ["full", "full+fixmatch"]
    spec = cfg.target_specs()[0]
    run = study._arm_config(cfg, spec, "auto", "full+fixmatch", {"per_class": 10}, 0, tmp_path / "a")
    assert (run.strategy, run.semi, run.unlabelled) == ("full", "fixmatch", ("rest_of_train",))
    assert has_unlabelled("full+fixmatch", cfg.unlabelled, {"per_class": 10})
    assert not has_unlabelled("full+fixmatch", cfg.unlabelled, {"label_fraction": None})  # frac1: nothing hidden
    plain = to_dict(study._arm_config(cfg, spec, "auto", "full", {"per_class": 10}, 0, tmp_path / "b"))
    before_semi = {k: v for k, v in plain.items() if k not in ("semi", *SEMI_FIELDS)}  # a metrics.json of earlier runs
    assert study._result_config(before_semi, ("fp32", False)) == study._result_config(plain, ("fp32", False))
    with pytest.raises(ValueError, match="needs unlabelled images"):
        study._check_grid(study.StudyConfig(out=tmp_path, targets=cfg.targets, inits=("auto",), semi=("fixmatch",)))
    with pytest.raises(KeyError, match="fixmatch"):
        study._check_grid(study.StudyConfig(out=tmp_path, targets=cfg.targets, inits=("auto",), semi=("fixmach",),
                                            unlabelled=("rest_of_train",)))


def test_study_checks_its_unlabelled_folders_once_before_any_arm(tiny: tuple[Path, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression (hostile-user probe): an empty unlabelled folder (or one without a readable image)
    # failed every semi arm on its own, after the other arms had trained; the study now refuses it
    # once, while planning, with load_unlabelled's error.
    import re

    from openmednet.eval import study, unlabelled

    data, extra = tiny
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    monkeypatch.setattr(study, "run_finetune", lambda run, target=None: pytest.fail(f"arm {run.out} ran"))
    grid = dict(out=tmp_path / "out", targets=({"name": "brain", "data": str(data), "given_splits": False},),
                inits=("scratch:mednet_test",), semi=("none", "fixmatch"), per_class=(3,))
    for folder, why in ((empty, "no images found under"), (broken, r"1 file\(s\) could not be decoded")):
        cfg = study.StudyConfig(**grid, unlabelled=(str(extra), str(folder)))
        with pytest.raises(ValueError, match=rf"study unlabelled: no unlabelled images found in "
                                             rf"{re.escape(str(folder))}: {why}.*no arm was run"):
            study.run_study(cfg)
    assert not (tmp_path / "out").exists()
    study._check_unlabelled(study.StudyConfig(**{**grid, "semi": ("none",)}, unlabelled=(str(empty),)))  # no arm reads it
    # Cheap: a good folder is listed and decoded only up to its first image; rest_of_train is not read.
    decoded = []
    real = unlabelled.read_item
    monkeypatch.setattr(unlabelled, "read_item", lambda item, **kw: (decoded.append(item), real(item, **kw))[1])
    unlabelled.check_unlabelled([str(extra), "rest_of_train"])
    assert len(decoded) == 1 and decoded[0].path.parent == extra


def test_a_study_refuses_semi_settings_its_arms_would_refuse_before_any_arm(tiny: tuple[Path, Path], tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    # Regression (hostile-user probe): unlabelled [rest_of_train, DIR] with semi [none, fixmatch]
    # trained the 'none' arm, then stopped when the first fixmatch arm was planned; a segmentation
    # study's semi arms failed one by one after training the others.
    from openmednet.eval import study

    data, extra = tiny
    monkeypatch.setattr(study, "run_finetune", lambda run, target=None: pytest.fail(f"arm {run.out} ran"))
    grid = dict(out=tmp_path / "out", targets=({"name": "brain", "data": str(data), "given_splits": False},),
                inits=("scratch:mednet_test",), semi=("none", "fixmatch"), per_class=(3,))
    with pytest.raises(ValueError, match="'rest_of_train' cannot be combined with folders"):
        study.run_study(study.StudyConfig(**grid, unlabelled=("rest_of_train", str(extra))))
    with pytest.raises(ValueError, match="segmentation has no semi-supervised mode yet.*semi: \\[none\\]"):
        study.run_study(study.StudyConfig(**grid, unlabelled=(str(extra),), task="segmentation"))
    with pytest.raises(ValueError, match="finite lambda_f"):
        study.run_study(study.StudyConfig(**{**grid, "semi": ("none", "freematch")}, unlabelled=(str(extra),),
                                          finetune={"lambda_f": float("nan")}))
    assert not (tmp_path / "out").exists()
    # A semi arm skipped by design (rest_of_train at the full label budget) is said, not silent.
    cfg = study.StudyConfig(**{**grid, "semi": ("fixmatch",), "per_class": ()}, unlabelled=("rest_of_train",))
    with caplog.at_level("WARNING"):
        assert list(study._plan(cfg, [], [])) == []
    assert "skipped: scratch:mednet_test full+fixmatch frac1 on brain: rest_of_train is empty" in caplog.text


def test_max_unlabelled_draws_a_seeded_subset_after_the_leakage_drop(tiny: tuple[Path, Path]) -> None:
    data, extra = tiny
    cfg = _cfg(data, Path("unused"), semi="fixmatch", unlabelled=(str(extra),), max_unlabelled=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target, splits, _ = prepare_splits(load_target(data, max_side=64), cfg)
    used = np.flatnonzero(splits == "train")
    unl, info = gather_unlabelled(cfg, target, splits, used)
    again, _ = gather_unlabelled(cfg, target, splits, used)
    other, _ = gather_unlabelled(FinetuneConfig(**{**cfg.__dict__, "seed": 1}), target, splits, used)
    everything, _ = gather_unlabelled(FinetuneConfig(**{**cfg.__dict__, "max_unlabelled": None}), target, splits, used)
    assert (info["n_found"], info["n_clean"], info["n_used"]) == (10, 10, 4) and len(unl) == 4
    assert unl.ids == again.ids and set(unl.ids) <= set(everything.ids) and len(everything) == 10
    assert other.ids != unl.ids  # the draw follows the run's seed
    with pytest.raises(ValueError, match="max_unlabelled must be >= 1"):
        _cfg(data, Path("unused"), semi="fixmatch", unlabelled=(str(extra),), max_unlabelled=0)


def test_a_folder_given_twice_or_nested_is_used_once(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    # Regression: --unlabelled DIR --unlabelled DIR/ (or DIR and a sub-folder of it) read every
    # image twice: each was trained on twice per epoch and metrics.json counted 20 of 10 images.
    from openmednet.eval.unlabelled import load_unlabelled

    _, extra = tiny
    nested = tmp_path / "all"
    shutil.copytree(extra, nested / "sub")
    (nested / "own.png").write_bytes(next(extra.glob("*.png")).read_bytes())  # a copy is another file: kept
    once = load_unlabelled([str(extra)], channels=1, max_side=64)
    with pytest.warns(UserWarning, match="10 files listed by more than one source are used once"):
        twice = load_unlabelled([str(extra), f"{extra}/"], channels=1, max_side=64)
    assert twice.ids == once.ids and len(twice) == 10
    with pytest.warns(UserWarning, match="10 files listed by more than one source"):
        both = load_unlabelled([str(nested / "sub"), str(nested)], channels=1, max_side=64)
    assert len(both) == 11 and both.ids[-1] == "all/own.png"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no unlabelled images found in .*empty"):
        load_unlabelled([str(extra), str(tmp_path / "empty")], channels=1, max_side=64)

"""Shared fixtures: the real data tree (../shared/data), slow-test opt-in, CPU determinism."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("OPENMEDNET_SHARED_DATA", REPO.parent / "shared" / "data"))

# Two cores: keep each test process at one intra-op thread so parallel helpers/tests don't thrash.
torch.set_num_threads(int(os.environ.get("OPENMEDNET_TEST_THREADS", "1")))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_net = pytest.mark.skip(reason="needs internet access (opt-in)")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "network" in item.keywords:
            item.add_marker(skip_net)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data; tests that need it skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data tree not found at {SHARED_DATA} (set OPENMEDNET_SHARED_DATA)")
    return SHARED_DATA


# ------------------------------------------------------------------------------------ segmentation
def _seg_subset(shared: Path, dst: Path, name: str = "gray/lgg_flair", patients: int = 4,
                per_patient: int = 4, rows_filter=None) -> Path:
    """A folder whose masks.csv lists real pairs of ``seg/<name>`` for the first ``patients`` groups
    (or first ``patients * per_patient`` rows when the set has no groups).

    The pairs are copied (same relative paths): like labels.csv, a masks.csv row outside its
    folder is skipped as ``"outside_root"`` (this fixture listed absolute paths before that rule).
    """
    src = shared / "seg" / name
    rows = list(csv.DictReader((src / "masks.csv").open()))
    if rows[0]["group"]:
        keep_groups = sorted({r["group"] for r in rows})[:patients]
        rows = [r for r in rows if r["group"] in keep_groups]
    else:
        rows = rows[: patients * per_patient]
    rows = rows_filter(rows) if rows_filter else rows
    dst.mkdir(parents=True, exist_ok=True)
    with (dst / "masks.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "mask", "split", "group"])
        writer.writeheader()
        for r in rows:
            for column in ("path", "mask"):
                (dst / r[column]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / r[column], dst / r[column])
            writer.writerow(r)
    shutil.copy(src / "classes.txt", dst / "classes.txt")
    return dst


@pytest.fixture(scope="session")
def seg_subset(shared_data):
    """``seg_subset(dst, name="gray/lgg_flair", patients=4, ...)``: a masks.csv folder of real pairs."""
    return lambda dst, *args, **kwargs: _seg_subset(shared_data, dst, *args, **kwargs)


@pytest.fixture(scope="session")
def seg_model_dir(tmp_path_factory) -> Path:
    """A fine-tuning run folder as `finetune --task segmentation` leaves it (``RUN/model``: weights +
    card), holding an untrained 2-class U-Net on ``scratch:mednet_test`` at 32 px (seed 0): the
    serving and export tests need the format, not a trained network."""
    from openmednet.eval.finetune import run_contract
    from openmednet.eval.segmentation import (
        build_segmentation_model,
        save_segmentation_model,
    )

    torch.manual_seed(0)
    model, _ = build_segmentation_model("scratch:mednet_test", 2, 1)
    model.pretrained_cfg = run_contract(model, 1, 32)
    run = tmp_path_factory.mktemp("seg_run")
    save_segmentation_model(model.eval(), run / "model", class_names=["background", "flair_abnormality"])
    return run


def _brain_subset(shared_data: Path, tmp: Path) -> tuple[Path, Path]:
    """A tiny real brain MRI target in ``tmp``: 24 labelled images (12 per class, splits drawn) and
    ``tmp/unlabelled``, 10 other images of the set (semi-supervised and pinned fine-tuning tests).

    The images are copied: ``labels.csv`` paths outside a target's folder are refused.
    """
    from PIL import Image

    brain = shared_data / "gray/targets/brain_mri_yes_no"
    rows = list(csv.DictReader((brain / "labels.csv").read_text().splitlines()))
    by_class = {c: [r for r in rows if r["label"] == c] for c in ("no", "yes")}
    with open(tmp / "labels.csv", "w", newline="") as f:
        f.write("path,label,split,group\n")
        for c, members in by_class.items():
            for k, r in enumerate(members[:12]):
                name = f"{c}{k}{Path(r['path']).suffix}"
                (tmp / name).write_bytes((brain / r["path"]).read_bytes())
                f.write(f"{name},{c},,\n")
    extra = tmp / "unlabelled"
    extra.mkdir()
    for c, members in by_class.items():
        for r in members[12:17]:
            Image.open(brain / r["path"]).convert("L").save(extra / f"{c}_{Path(r['path']).stem}.png")
    return tmp, extra


@pytest.fixture(scope="session")
def brain_subset(shared_data):
    """``brain_subset(dst)``: ``_brain_subset`` of the real brain MRI set into ``dst``."""
    return lambda dst: _brain_subset(shared_data, dst)

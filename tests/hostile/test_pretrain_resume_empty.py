"""Issue 14: ``openmednet pretrain --resume`` on a folder without a checkpoint says it starts afresh.

A real run: a tiny corpus built from real brain MRI JPEGs of ../shared/data, two training steps.
"""

from __future__ import annotations

import csv
import re
import shutil
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from openmednet.cli.app import app
from openmednet.data.corpus import build_corpus
from openmednet.data.sources import SourceSpec


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> Path:
    """8 real images in each of two class folders, built into a 32 px gray corpus."""
    root = tmp_path_factory.mktemp("src")
    source = shared_data / "gray/pretrain/brain_tumor_mri"
    with open(source / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for label in ("glioma", "notumor"):
        (root / label).mkdir()
        for row in [r for r in rows if r["label"] == label][:8]:
            shutil.copy(source / row["path"], root / label / Path(row["path"]).name)
    out = tmp_path_factory.mktemp("corpus")
    build_corpus([SourceSpec("mri", str(root))], out, channels=1, image_size=32)
    return out


def _pretrain(corpus: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, [
        "pretrain", "--corpus", str(corpus), "--out", str(out), "--objective", "supervised", *extra,
        "--set", "model.name=mednet_test", "--set", "data.image_size=32", "--set", "data.batch_size=4",
        "--set", "data.num_workers=0", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2",
        "--set", "train.progress=false", "--set", "monitor.enabled=false", "--set", "train.precision=fp32",
    ])


def test_resume_on_an_empty_folder_says_it_starts_from_scratch(corpus, tmp_path):
    # The warning is run_pretraining's (the one place, tests/engine/test_resume.py); the CLI shows it.
    out = tmp_path / "run"
    out.mkdir()
    with pytest.warns(UserWarning, match=re.escape(f"{out} holds no checkpoint-last.pt, so this run starts from scratch")):
        result = _pretrain(corpus, out, "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "checkpoint-last.pt").is_file()
    # A real resume of that run says nothing of the kind.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _pretrain(corpus, out, "--resume")
    assert again.exit_code == 0, again.output
    assert not [w for w in caught if "starts from scratch" in str(w.message)]

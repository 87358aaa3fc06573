"""``openmednet quickstart`` end to end: shipped weights + fingerprint, comparison table, report, refusal.

The command runs in a subprocess with ``$OPENMEDNET_WEIGHTS_DIR`` pointing at weights saved here
(Gray-MedNet at mednet_test width), so this process's registry is never touched. A tiny
configuration (1 epoch, 32 px, 3 seeds) keeps it to seconds; the real run is timed in
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openmednet import create_model
from openmednet.data.corpus import build_corpus
from openmednet.data.fingerprint import save_corpus_fingerprint
from openmednet.data.sources import SourceSpec
from openmednet.models import save_pretrained
from openmednet.quickstart import demo_path

TAG = "qs_test"
LEAKED_TEST_ROWS = (5, 123)


def _corpus(root: Path, rows: dict[str, tuple[int, ...]]) -> Path:
    """A corpus built by the real builder from demo images (``{split: rows}``)."""
    with np.load(demo_path()) as z:
        for split, idx in rows.items():
            (root / "src/xray").mkdir(parents=True, exist_ok=True)
            for r in idx:
                Image.fromarray(z[f"{split}_images"][r]).save(root / "src/xray" / f"{split}{r}.png")
    build_corpus([SourceSpec(name="cxr", root=root / "src")], root / "corpus", channels=1, image_size=32)
    return root / "corpus"


def _weights(folder: Path, corpus: Path) -> Path:
    """Shipped-weights folder: Gray-MedNet (width 0.25) backbone + its corpus fingerprint."""
    save_corpus_fingerprint(corpus, folder / "fp.npz")
    torch.manual_seed(0)
    backbone = create_model("mednet_gray", width_mult=0.25, num_classes=0)
    save_pretrained(backbone, folder, tag=TAG, default=True, corpus_fingerprint=folder / "fp.npz")
    (folder / "fp.npz").unlink()  # only <arch>.<tag>.corpus.npz travels
    return folder


def _quickstart(out: Path, weights_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENMEDNET_WEIGHTS_DIR": str(weights_dir), "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
    cmd = [sys.executable, "-m", "openmednet", "quickstart", "--out", str(out), "--epochs", "1",
           "--image-size", "32", "--per-class", "0", "--quiet", *extra]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("quickstart")
    clean = _weights(tmp / "clean_weights", _corpus(tmp / "clean", {"train": (0, 1, 2, 3)}))
    leaky = _weights(tmp / "leaky_weights", _corpus(tmp / "leaky", {"train": (0, 1), "test": LEAKED_TEST_ROWS}))
    out = tmp / "out"
    first = _quickstart(out, clean, "--jobs", "2")  # 2 spawned workers of `python -m openmednet`
    first_report = json.loads((out / "report.json").read_text()) if first.returncode == 0 else None
    first_md = (out / "report.md").read_text() if first.returncode == 0 else ""
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.json")}
    second = _quickstart(out, leaky)  # same out: the scratch and ImageNet arms are reused
    return {"tmp": tmp, "out": out, "first": first, "first_report": first_report, "first_md": first_md, "stamps": stamps, "second": second}


def test_quickstart_compares_three_inits_over_three_seeds(runs: dict) -> None:
    first = runs["first"]
    assert first.returncode == 0, first.stderr[-3000:]
    report = runs["first_report"]
    assert len(report["arms"]) == 9  # 3 inits x 1 budget x 3 seeds
    assert [r["init"] for r in report["summary"]] == [f"mednet_gray.{TAG}", f"scratch:mednet_gray.{TAG}", "efficientnet_lite0"]
    assert all(r["seeds"] == 3 and r["n_train"] == 300 for r in report["summary"])
    assert report["refused"] == []
    assert [(c["init"], c["n_test"], c["n_leaked"]) for c in report["leakage_checks"]] == [(f"mednet_gray.{TAG}", 300, 0)]
    # The table rows: readable init names with the AUROC of report.json (mean ± sd [CI]).
    for label, row in zip((f"Gray-MedNet, pre-trained ({TAG})", "Gray-MedNet, from scratch", "EfficientNet-Lite0, ImageNet"),
                          report["summary"], strict=True):
        line = next(ln for ln in first.stdout.splitlines() if label in ln)
        a = row["auroc_macro"]
        assert f"{a['mean']:.3f} ± {a['sd']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]" in line
    assert "leakage check: 0 of 300 test images of pneumoniamnist_demo" in first.stdout
    assert f"report: {runs['out'] / 'report.md'}" in first.stdout and "elapsed:" in first.stdout
    assert "(2 arms at once)" in first.stdout and "2 arms at once on 1 CPU thread(s) each" in runs["first_md"]


def test_scratch_arm_has_the_width_of_the_shipped_weights(runs: dict) -> None:
    def card(init_dir: str) -> dict:
        path = runs["out"] / "runs/pneumoniamnist_demo" / init_dir / "full/frac1/seed0/model/model_card.json"
        return json.loads(path.read_text())

    scratch_card, pretrained_card = card(f"scratch_mednet_gray.{TAG}"), card(f"mednet_gray.{TAG}")
    assert scratch_card["model_args"]["width_mult"] == pretrained_card["model_args"]["width_mult"] == 0.25
    assert scratch_card["weights"]["num_params"] == pretrained_card["weights"]["num_params"]


def test_report_files_name_the_weights_and_the_sample(runs: dict) -> None:
    md = runs["first_md"]
    assert "## pneumoniamnist_demo" in md and "## Quick start" in md and f"`mednet_gray.{TAG}`" in md
    assert f"| pneumoniamnist_demo | mednet_gray.{TAG} | `mednet_gray.{TAG}.corpus.npz` | 300 | 0 |" in md
    assert (runs["out"] / "plots/label_efficiency_pneumoniamnist_demo.png").is_file()


def test_demo_test_images_in_the_fingerprint_refuse_the_mednet_arm(runs: dict) -> None:
    second = runs["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads((runs["out"] / "report.json").read_text())
    assert [r["init"] for r in report["refused"]] == [f"mednet_gray.{TAG}"]
    assert f"{len(LEAKED_TEST_ROWS)} of 300 test images of 'pneumoniamnist_demo'" in report["refused"][0]["reason"]
    assert {r["init"] for r in report["summary"]} == {f"scratch:mednet_gray.{TAG}", "efficientnet_lite0"}
    assert "refused" in second.stdout and f"refused: mednet_gray.{TAG}:" in " ".join(second.stdout.split())
    md = (runs["out"] / "report.md").read_text()
    assert "Refused arms" in md
    assert f"| pneumoniamnist_demo | mednet_gray.{TAG} | `mednet_gray.{TAG}.corpus.npz` | 300 | {len(LEAKED_TEST_ROWS)} |" in md
    # The other arms were finished with the same configuration: reused, not retrained.
    assert {p: p.stat().st_mtime_ns for p in runs["stamps"]} == runs["stamps"]


def test_without_shipped_weights_the_error_says_how_to_get_them(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = _quickstart(tmp_path / "out", tmp_path / "empty")
    assert result.returncode == 2
    assert "no Gray-MedNet weights are installed" in result.stderr and "pip install the release" in result.stderr

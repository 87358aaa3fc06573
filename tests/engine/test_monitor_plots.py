"""k-NN transfer monitor and the loss-curve plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

import openmednet
from openmednet.data.shards import CorpusArrays
from openmednet.engine.monitor import KnnMonitor, balanced_accuracy, knn_predict
from openmednet.engine.plots import plot_loss_curve


def naive_knn(bank, labels, query, num_classes, k, temperature):
    out = []
    for q in query:
        sims = sorted(((float(q @ b), int(lab)) for b, lab in zip(bank, labels)), reverse=True)[:k]
        votes = [0.0] * num_classes
        for s, lab in sims:
            votes[lab] += float(np.exp(s / temperature))
        out.append(int(np.argmax(votes)))
    return out


def test_knn_predict_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    query = torch.nn.functional.normalize(torch.randn(15, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (40,), generator=g)
    pred = knn_predict(bank, labels, query, 3, k=5, temperature=0.5)
    assert pred.tolist() == naive_knn(bank, labels, query, 3, 5, 0.5)


def test_balanced_accuracy_matches_sklearn():
    truth = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 5])
    pred = torch.tensor([0, 1, 0, 1, 2, 2, 2, 0, 2, 5])
    assert balanced_accuracy(truth, pred) == pytest.approx(balanced_accuracy_score(truth.numpy(), pred.numpy()))


def test_monitor_on_real_images_finds_each_image_itself(tiny_corpus: Path):
    # Query = bank with k=1: the nearest neighbour of an image is itself, so top-1 must be exactly 1.
    arrays = CorpusArrays(tiny_corpus)
    idx = np.flatnonzero(arrays.label >= 0)
    images = torch.stack([torch.from_numpy(arrays.image(int(i))).float() / 255 for i in idx])
    labels = torch.from_numpy(arrays.label[idx].astype(np.int64))
    backbone = openmednet.create_model("mednet_test", num_classes=0).train()
    metrics = KnnMonitor(images, labels, images, labels, k=1)(backbone)
    assert metrics == {"knn/top1": 1.0, "knn/balanced_acc": 1.0}
    assert backbone.training  # mode restored


def test_monitor_needs_labelled_images():
    with pytest.raises(ValueError, match="labelled bank and query"):
        KnnMonitor(torch.zeros(0, 1, 32, 32), torch.zeros(0), torch.zeros(2, 1, 32, 32), torch.zeros(2))


def test_loss_plot_from_metrics(tmp_path: Path):
    records = [{"kind": "step", "epoch": 0, "step": s, "train/loss": 2.0 / s, "lr": 0.1} for s in range(1, 7)]
    records += [{"kind": "epoch", "epoch": e, "step": 3 * (e + 1), "train/loss": 1.0 / (e + 1), "knn/top1": 0.5,
                 "knn/balanced_acc": 0.4} for e in range(2)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_loss_curve(metrics, tmp_path / "loss.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (600, 350)
        # Drawn, not blank: the lines put many distinct colours on the canvas.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16)) > 20
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_loss_curve(tmp_path / "missing.jsonl", tmp_path / "x.png")


def test_loss_plot_leaves_the_callers_backend_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import matplotlib

    def refuse(*args, **kwargs):
        raise AssertionError(f"plot_loss_curve switched the matplotlib backend: matplotlib.use{args}")

    before = matplotlib.get_backend()
    monkeypatch.setattr(matplotlib, "use", refuse)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"kind": "step", "epoch": 0, "step": 1, "train/loss": 1.0}) + "\n")
    plot_loss_curve(metrics, tmp_path / "loss.png")
    assert matplotlib.get_backend() == before
    with Image.open(tmp_path / "loss.png") as im:
        assert im.size == (600, 350)

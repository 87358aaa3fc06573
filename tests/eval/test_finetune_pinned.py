"""Pinned fine-tuning outputs (issue 10, "one training engine"): tiny real runs whose every number is
hard-coded, so a refactor of the training loop must reproduce them bit for bit.

The values were generated with the pre-refactor code (``eval.finetune._train``, its own epoch loop
over ``engine.trainer.train_one_epoch``) and checked to be identical run to run on the 2-core AVX2
CPU (fp32, one intra-op thread: ``tests/conftest.py``); fp32 kernels differ by CPU kind, so they are
kept per ``torch.backends.cpu.get_cpu_capability()`` (``PINNED``), and a CPU kind without a set skips. Each run checks its per-epoch history
(train loss, validation score and loss, learning rate: exact floats, as ``history.json`` stores
them), the best epoch, a SHA-256 of the saved weights (every tensor, in key order) and a SHA-256 of
the test outputs (``predictions.csv`` or ``per_image.csv``). They cover classification ``full``
(also with ``channels_last``: NHWC inputs, NCHW weights), FixMatch and one pseudo-label round
(teacher and a noisy student), both of which restore an earlier best epoch's weights, and
segmentation (Dice model choice), which early stopping ends before its last epoch.

If a change is meant to alter the numbers (a new default, a fixed defect), regenerate them with
``python tests/eval/test_finetune_pinned.py`` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file

from openmednet.engine.precision import cpu_capability
from openmednet.eval.finetune import FinetuneConfig, run_finetune



def _configs(brain: Path, unlabelled: Path, lgg: Path, out: Path) -> dict[str, FinetuneConfig]:
    base = {"init": "scratch:mednet_test", "image_size": 32, "batch_size": 8, "lr": 1e-3, "n_boot": 0, "max_side": 64,
            "seed": 0}
    cls = {**base, "data": brain, "given_splits": False, "test_fraction": 0.25}
    return {
        "full": FinetuneConfig(**cls, out=out / "full", epochs=4, patience=1, warmup_epochs=1),
        # NHWC inputs to the NCHW weights (fp32 here): converting the weights too changes the last bits.
        "full_channels_last": FinetuneConfig(**cls, out=out / "full_cl", epochs=2, patience=1, warmup_epochs=1,
                                             channels_last=True),
        "fixmatch": FinetuneConfig(**cls, out=out / "fixmatch", epochs=2, patience=2, per_class=3, semi="fixmatch",
                                   unlabelled=(str(unlabelled),), semi_threshold=0.5),
        "pseudo_label": FinetuneConfig(**cls, out=out / "pseudo", epochs=2, patience=2, per_class=3, semi="pseudo_label",
                                       unlabelled=(str(unlabelled),), semi_threshold=0.5, rounds=1),
        "segmentation": FinetuneConfig(**base, data=lgg, out=out / "seg", task="segmentation", epochs=4, patience=1),
    }


def _sha256_weights(path: Path) -> str:
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _plain(value):
    # NaN != NaN: compare a validation AUROC of a one-class split by its name.
    return "nan" if isinstance(value, float) and math.isnan(value) else value


def observe(out: Path, shared_data: Path) -> dict:
    """The pinned quantities of one finished run directory. Paths into ``shared_data`` in the test
    outputs are hashed relative to it (CI checks out elsewhere); the segmentation subset's
    per_image.csv ids are relative to its own folder (its masks.csv lists copied pairs, since rows
    outside the folder are skipped)."""
    metrics = json.loads((out / "metrics.json").read_text())
    history = [{k: _plain(v) for k, v in h.items()} for h in json.loads((out / "history.json").read_text())]
    test_file = out / ("per_image.csv" if metrics.get("task") == "segmentation" else "predictions.csv")
    return {
        "history": history,
        "best_epoch": metrics["best_epoch"],
        "weights_sha256": _sha256_weights(out / "model" / "model.safetensors"),
        "test_sha256": hashlib.sha256(test_file.read_bytes().replace(str(shared_data).encode(), b"$SHARED_DATA")).hexdigest(),
    }


#: Per CPU kind (``torch.backends.cpu.get_cpu_capability()``): oneDNN and ATen pick other fp32
#: kernels on AVX512 than on AVX2, whose sums round differently, so exact numbers hold per kind.
#: Each set was regenerated twice on its CPU with identical output.
PINNED: dict[str, dict[str, dict]] = {
    # 2-core AMD EPYC, AVX2 only (the values of the pre-refactor code, issue 10).
    "AVX2": {
        "full": {
            "history": [
                {"epoch": 1, "train_loss": 0.750966455255236, "val_auroc": 1.0, "val_loss": 0.7006475085009534, "lr": 0.001},
                {"epoch": 2, "train_loss": 0.5952229584966388, "val_auroc": 1.0, "val_loss": 0.6174252619782454, "lr": 0.00075},
                {"epoch": 3, "train_loss": 0.9073911734989711, "val_auroc": 1.0, "val_loss": 0.48274916079581154, "lr": 0.0002500000000000001},
                {"epoch": 4, "train_loss": 0.8875354698726109, "val_auroc": 1.0, "val_loss": 0.4432529736199083, "lr": 0.0},
            ],
            "best_epoch": 4,
            "weights_sha256": "2878e09bfcf0185d880936b53a7a9461daf8c1745edcc3b9e037e065bd528deb",
            "test_sha256": "ad72b9ce753974716f4a44718597713a7ea98b299d630ae0a20c6c6073889333",
        },
        "full_channels_last": {
            "history": [
                {"epoch": 1, "train_loss": 0.750966455255236, "val_auroc": 1.0, "val_loss": 0.7006475085009534, "lr": 0.001},
                {"epoch": 2, "train_loss": 0.5952229584966388, "val_auroc": 1.0, "val_loss": 0.6083566518072616, "lr": 0.0},
            ],
            "best_epoch": 2,
            "weights_sha256": "c6efdcba8693d89e91e2879781fb26e5c4ffb9389c94142883adcc30cd26369c",
            "test_sha256": "2629134aef2d281444366f66b69a4782526c1620c76e2419193987139045eeeb",
        },
        "fixmatch": {
            "history": [
                {"epoch": 1, "train_loss": 1.3266327381134033, "val_auroc": 0.75, "val_loss": 0.6456979301910221, "lr": 0.001},
                {"epoch": 2, "train_loss": 1.3453969955444336, "val_auroc": 0.0, "val_loss": 2.3779489086344547, "lr": 0.0},
            ],
            "best_epoch": 1,
            "weights_sha256": "81fbee42ff552e7ba6f0dc2fde85ea97d3b6d8d1adbcd786b86fc84c916ea9a9",
            "test_sha256": "44b2e74d556087e77356c9c58d9bbe14f058ad3860dc1b9b27dc98a7262c44bf",
        },
        "pseudo_label": {
            "history": [
                {"epoch": 1, "train_loss": 0.7080612182617188, "val_auroc": 1.0, "val_loss": 0.5568107597332858, "lr": 0.001},
                {"epoch": 2, "train_loss": 0.5367291569709778, "val_auroc": 0.0, "val_loss": 0.897272946078734, "lr": 0.0},
            ],
            "best_epoch": 1,
            "weights_sha256": "f1e1a0d4b85b746f4172dfc839937ae88d818ea2608223d7d20f34ada68ad2f1",
            "test_sha256": "0aa8a452c5a43d033cade7bf02f2a71d0392d22811762bfad0fb4cbb87f5ca71",
        },
        "segmentation": {
            "history": [
                {"epoch": 1, "train_loss": 2.40905233224233, "val_dice": 0.0, "val_loss": 1.1366276126354933, "lr": 0.001},
                {"epoch": 2, "train_loss": 1.1678600112597148, "val_dice": 0.0, "val_loss": 10.33194477314828, "lr": 0.00075},
            ],
            "best_epoch": 1,
            "weights_sha256": "14de3e872d5f9ef3fa8c0a91bcc287d51c1abfea7b2b5843c57a2272ec2330a4",
            # ids "images/..." since masks.csv rows outside the folder are skipped (were
            # "$SHARED_DATA/seg/gray/lgg_flair/images/...": the same bytes otherwise, hash d474827f...)
            "test_sha256": "8cfa048fe4d01b82b9740e87d25655663a14fe7b486ed4da8a04a53177651dfd",
        },
    },
    # 2-core AMD EPYC with AVX512 (and AVX512-BF16), the same fine-tuning code as the AVX2 set: this
    # CPU kind had no set, so the test failed on it.
    "AVX512": {
        "full": {
            "history": [
                {"epoch": 1, "train_loss": 0.754678053515298, "val_auroc": 1.0, "val_loss": 0.6929780761715619, "lr": 0.001},
                {"epoch": 2, "train_loss": 0.5981668148721967, "val_auroc": 1.0, "val_loss": 0.6035513376627027, "lr": 0.00075},
                {"epoch": 3, "train_loss": 0.8859792096274239, "val_auroc": 1.0, "val_loss": 0.47451613532417236, "lr": 0.0002500000000000001},
                {"epoch": 4, "train_loss": 0.8931682535580227, "val_auroc": 1.0, "val_loss": 0.4363326304190357, "lr": 0.0},
            ],
            "best_epoch": 4,
            "weights_sha256": "a6e037a2181f44c834c6ebe3f0b6e60e66522208e1eba118d0969a97495ca14c",
            "test_sha256": "47761f347cfb2e9735835dfcdc91bddcfc2e80542bd9872f50569c25568bb4d6",
        },
        "full_channels_last": {
            "history": [
                {"epoch": 1, "train_loss": 0.754678053515298, "val_auroc": 1.0, "val_loss": 0.6929780761715619, "lr": 0.001},
                {"epoch": 2, "train_loss": 0.5981668148721967, "val_auroc": 1.0, "val_loss": 0.5979604144753321, "lr": 0.0},
            ],
            "best_epoch": 2,
            "weights_sha256": "8557f0377c7fd8b5cfbf560a6c822cefc7825c5eed43bfc4b23f54d42e389d82",
            "test_sha256": "ed72dc820a5124d000475c056ecf64e010289262a04a276a33997222609c614d",
        },
        "fixmatch": {
            "history": [
                {"epoch": 1, "train_loss": 1.3270912170410156, "val_auroc": 0.75, "val_loss": 0.6558784311373048, "lr": 0.001},
                {"epoch": 2, "train_loss": 1.335404872894287, "val_auroc": 0.0, "val_loss": 2.5127653809006505, "lr": 0.0},
            ],
            "best_epoch": 1,
            "weights_sha256": "5f38b2490d0c52c908107ab35e40c5d5a5fd171798d4376835d56b9dccad0d34",
            "test_sha256": "baa821300d0fd7ea0e321556222c03f36819ca0839919700a11e24f8d494e915",
        },
        "pseudo_label": {
            "history": [
                {"epoch": 1, "train_loss": 0.7070176601409912, "val_auroc": 1.0, "val_loss": 0.5528335757571905, "lr": 0.001},
                {"epoch": 2, "train_loss": 0.5372933745384216, "val_auroc": 0.0, "val_loss": 0.9118635016089087, "lr": 0.0},
            ],
            "best_epoch": 1,
            "weights_sha256": "599021fa12512ea0faaf8c249a583e182183bf9349a7b2fc855ffe2d49f81fbd",
            "test_sha256": "fd039119c1df6c25008dcac6cdffc97936bc702c9ab2e75b93fa0033ee41fffc",
        },
        "segmentation": {
            "history": [
                {"epoch": 1, "train_loss": 2.413220763206482, "val_dice": 0.0, "val_loss": 1.828289557248354, "lr": 0.001},
                {"epoch": 2, "train_loss": 1.1714986165364583, "val_dice": 0.0, "val_loss": 7.3157097939401865, "lr": 0.00075},
            ],
            "best_epoch": 1,
            "weights_sha256": "f562c327b98fce012f23af2e3597269077ebac3af3c3a60f65e429098e10104b",
            "test_sha256": "bac89a35a3a72a1ab8e4f06e17a9a9550d80789f0681f81ec51e076182b32354",
        },
    },
}


@pytest.fixture(scope="module")
def data(brain_subset, seg_subset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    brain, unlabelled = brain_subset(tmp_path_factory.mktemp("brain"))
    return brain, unlabelled, seg_subset(tmp_path_factory.mktemp("lgg"), patients=5)


@pytest.mark.parametrize("name", ["full", "full_channels_last", "fixmatch", "pseudo_label", "segmentation"])
def test_finetune_outputs_are_pinned(name: str, data, shared_data: Path, tmp_path: Path) -> None:
    capability = cpu_capability()
    if capability not in PINNED:
        pytest.skip(f"no pinned numbers for CPU capability {capability} (have {sorted(PINNED)}): run "
                    f"python tests/eval/test_finetune_pinned.py twice here and add its identical output to PINNED")
    cfg = _configs(*data, tmp_path)[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_finetune(cfg)
    assert observe(cfg.out, shared_data) == PINNED[capability][name]


if __name__ == "__main__":  # regenerate: python tests/eval/test_finetune_pinned.py [name ...]
    import tempfile

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import SHARED_DATA, _brain_subset, _seg_subset

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "brain").mkdir()
        brain, unlabelled = _brain_subset(SHARED_DATA, root / "brain")
        configs = _configs(brain, unlabelled, _seg_subset(SHARED_DATA, root / "lgg", patients=5), root / "runs")
        found = {}
        for name in sys.argv[1:] or list(configs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_finetune(configs[name])
            found[name] = observe(configs[name].out, SHARED_DATA)
        print(json.dumps(found, indent=1))

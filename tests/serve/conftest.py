"""Fixtures for the serving tests: a saved tiny model directory and real files of each format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openmednet import create_model
from openmednet.export.safetensors import export_safetensors
from openmednet.serve.predictor import Predictor

LABELS = ("no", "yes")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A 2-class mednet_test saved as model.safetensors + model_card.json (random weights, seed 0)."""
    torch.manual_seed(0)
    model = create_model("mednet_test", num_classes=2).eval()
    out = tmp_path_factory.mktemp("model")
    export_safetensors(model, out, label_names=LABELS)
    return out


@pytest.fixture(scope="session")
def predictor(model_dir) -> Predictor:
    return Predictor.from_spec(model_dir)


@pytest.fixture(scope="session")
def real_files(shared_data) -> dict[str, Path]:
    """One real file per case: gray JPEG, gray-content RGB JPEG, colour JPEG, DICOM, NIfTI volume."""
    files = {
        "gray": shared_data / "gray/targets/brain_mri_yes_no/no/1 no.jpeg",
        "rgb_gray": shared_data / "gray/targets/brain_mri_yes_no/no/2 no.jpeg",
        "color": shared_data / "color/pretrain/isic_archive/images/ISIC_0000000.jpg",
        "dicom": shared_data / "formats/pydicom-3.0.2/CT_small.dcm",
        "nifti": shared_data / "formats/nibabel-5.4.2/tests_data/anatomical.nii",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        pytest.skip(f"real test files missing: {missing}")
    return files

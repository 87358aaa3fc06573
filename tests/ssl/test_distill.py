"""Teacher feature distillation: exact re-normalisation, the FD loss, a frozen unregistered teacher,
and objective parts (a real pre-training run with it: tests/engine/test_pretrain_cli.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from openmednet.engine.pretrain import objective_parts
from openmednet.models import create_model
from openmednet.ssl.distill import FeatureDistillation, build_teacher, renormalize

DEMO = Path(__file__).resolve().parents[2] / "src" / "openmednet" / "assets" / "demo" / "pneumoniamnist_demo.npz"


def _real_gray_pixels() -> torch.Tensor:
    """Two real chest X-rays from the embedded demo, ``(2, 1, 28, 28)`` in [0, 1]."""
    with np.load(DEMO) as z:
        key = next(k for k in z.files if "images" in k)
        images = z[key][:2].astype(np.float32) / 255.0
    return torch.from_numpy(images).reshape(2, 1, *images.shape[-2:])


def test_renormalize_maps_student_gray_to_teacher_rgb_exactly():
    pixels = _real_gray_pixels()
    student = (pixels - 0.5) / 0.25
    teacher_input = renormalize(student, (0.5,), (0.25,), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 3)
    expected = ((pixels - 0.5) / 0.5).expand(-1, 3, -1, -1)
    assert teacher_input.shape == (2, 3, 28, 28)
    torch.testing.assert_close(teacher_input, expected, rtol=0, atol=1e-6)


def test_renormalize_colour_to_gray_averages_channels():
    x = torch.rand(1, 3, 4, 4)
    out = renormalize((x - 0.5) / 0.25, (0.5,), (0.25,), (0.5,), (0.5,), 1)
    torch.testing.assert_close(out, (x.mean(1, keepdim=True) - 0.5) / 0.5, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return build_teacher("efficientnet_lite0")


def test_loss_is_smooth_l1_to_the_layer_normed_teacher_features(teacher: torch.nn.Module):
    torch.manual_seed(0)
    pixels = torch.nn.functional.interpolate(_real_gray_pixels(), size=64, mode="bilinear")
    views = (pixels - 0.5) / 0.25
    student = create_model("mednet_test", num_classes=0)
    objective = FeatureDistillation(teacher, student.num_features, (0.5,), (0.25,), hidden_dim=0).eval()
    features = student(views)
    loss = objective(views, features)
    with torch.no_grad():
        target = teacher(((pixels - 0.5) / 0.5).expand(-1, 3, -1, -1))
    target = (target - target.mean(1, keepdim=True)) / torch.sqrt(target.var(1, unbiased=False, keepdim=True) + 1e-5)
    expected = torch.nn.functional.smooth_l1_loss(objective.projector(features), target, beta=2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.stem.conv1.conv.weight.grad is not None  # gradients reach the student


def test_teacher_stays_frozen_in_eval_mode_and_out_of_the_state_dict(teacher: torch.nn.Module):
    objective = FeatureDistillation(teacher, 16, (0.5,), (0.25,), loss="cosine")
    teacher.train()  # whatever mode it arrives in, the objective's train() keeps it in eval mode
    objective.train()
    assert objective.projector.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(k.startswith("projector.") for k in objective.state_dict())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in objective.parameters()) < n_teacher  # only the projector's


def test_cosine_loss_is_zero_for_identical_directions(teacher: torch.nn.Module):
    objective = FeatureDistillation(teacher, 1280, (0.5,), (0.25,), hidden_dim=0, loss="cosine").eval()
    views = (torch.nn.functional.interpolate(_real_gray_pixels(), size=64, mode="bilinear") - 0.5) / 0.25
    with torch.no_grad():
        objective.projector.weight.copy_(torch.eye(1280))
        objective.projector.bias.zero_()
        feats = objective.teacher_features(views)
        assert objective(views, feats).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "kind,parts",
    [("supervised", {"supervised"}), ("combined", {"supervised", "simclr"}), ("distill", {"distill"}),
     ("supervised+distill", {"supervised", "distill"}), ("simclr + distill", {"simclr", "distill"})],
)
def test_objective_parts(kind: str, parts: set[str]):
    assert objective_parts(kind) == parts


def test_objective_parts_errors():
    with pytest.raises(KeyError, match="did you mean 'distill'"):
        objective_parts("supervised+distil")
    with pytest.raises(ValueError, match="distinct"):
        objective_parts("supervised+supervised")


def test_map_target_is_smooth_l1_per_location_on_the_teachers_grid(teacher: torch.nn.Module):
    """``target="map"``: the student's last map pooled to the teacher's grid, projected per location,
    against the teacher's last map normalised per location (FD per token)."""
    torch.manual_seed(0)
    pixels = torch.nn.functional.interpolate(_real_gray_pixels(), size=64, mode="bilinear")
    views = (pixels - 0.5) / 0.25
    student = create_model("mednet_test", num_classes=0)
    objective = FeatureDistillation(teacher, student.num_features, (0.5,), (0.25,), hidden_dim=0, target="map").eval()
    student_map = student.forward_features(views)
    loss = objective(views, student_map)
    with torch.no_grad():
        target = teacher.forward_features(((pixels - 0.5) / 0.5).expand(-1, 3, -1, -1))
    assert target.shape == (2, 1280, 2, 2)  # stride 32 at 64 px
    assert student_map.shape[-2:] == (4, 4)  # MedNet stops at stride 16
    target = (target - target.mean(1, keepdim=True)) / torch.sqrt(target.var(1, unbiased=False, keepdim=True) + 1e-5)
    pred = objective.projector(torch.nn.functional.avg_pool2d(student_map, 2))
    expected = torch.nn.functional.smooth_l1_loss(pred, target, beta=2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.stem.conv1.conv.weight.grad is not None


def test_map_target_rejects_pooled_features_and_unknown_targets(teacher: torch.nn.Module):
    objective = FeatureDistillation(teacher, 16, (0.5,), (0.25,), target="map")
    assert isinstance(objective.projector[0], torch.nn.Conv2d)
    with pytest.raises(ValueError, match="4-d student features"):
        objective(torch.zeros(2, 1, 32, 32), torch.zeros(2, 16))
    with pytest.raises(KeyError, match="distill_target"):
        FeatureDistillation(teacher, 16, (0.5,), (0.25,), target="maps")


def test_pretrain_module_feeds_the_map_to_a_map_target_and_pools_for_the_rest(teacher: torch.nn.Module):
    from openmednet.engine.pretrain_module import PretrainModule

    torch.manual_seed(0)
    student = create_model("mednet_test", num_classes=0)
    objective = FeatureDistillation(teacher, student.num_features, (0.5,), (0.25,), target="map")
    module = PretrainModule(student, distill=objective).eval()
    views = (torch.nn.functional.interpolate(_real_gray_pixels(), size=64, mode="bilinear") - 0.5) / 0.25
    out = module(views, torch.tensor([-1, -1]))
    torch.testing.assert_close(out["loss"], objective(views, student.forward_features(views)))
    torch.testing.assert_close(student.forward_head(student.forward_features(views), pre_logits=True), student(views))

"""Grad-CAM: agreement with pytorch-grad-cam, a known-answer localisation test, overlays."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from openmednet import create_model
from openmednet.explain.gradcam import (
    GradCAM,
    default_target_layer,
    overlay_cam,
    overlay_png,
)

SIZE, SQUARE = 64, 16


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mednet_test", num_classes=3).eval()


def test_default_layer_depends_on_input_size(model):
    assert default_target_layer(model) == "blocks.7"
    assert default_target_layer(model, (1, 224, 224)) == "blocks.7"  # 14x14
    assert default_target_layer(model, (112, 112)) == "blocks.7"  # 7x7
    assert default_target_layer(model, (1, 64, 64)) == "blocks.5"  # 4x4 would be too coarse: 8x8
    assert default_target_layer(model, (32, 32)) == "blocks.3"  # 8x8 at stride 4
    assert GradCAM(model)(torch.rand(1, 1, SIZE, SIZE), upsample=False).shape == (1, 4, 4)
    assert GradCAM(model, input_size=(SIZE, SIZE))(torch.rand(1, 1, SIZE, SIZE), upsample=False).shape == (1, 8, 8)


def test_matches_pytorch_grad_cam(model):
    """Same maps as the reference package at the layer's resolution (no resize in between)."""
    from pytorch_grad_cam import GradCAM as ReferenceCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class NoResize(ReferenceCAM):
        def get_target_width_height(self, input_tensor):  # keep the (h, w) of the layer
            return None

    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    predicted = model(x).argmax(1).tolist()
    ours = GradCAM(model, "blocks.5")(x, target=predicted, upsample=False).numpy()
    with NoResize(model=model, target_layers=[model.blocks[5]]) as ref_cam:
        ref = ref_cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in predicted])
    assert ours.shape == ref.shape == (2, 8, 8)
    assert ((ours > 0).sum(axis=(1, 2)) > 10).all(), "degenerate maps would make the comparison vacuous"
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(ours.max(axis=(1, 2)), 1.0, atol=1e-5)


def test_threads_get_their_own_maps(model):
    xs = [torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    cam = GradCAM(model)
    sequential = [cam(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(cam, xs))
    for a, b in zip(sequential, parallel):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(sequential[0], sequential[1])


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="not a module"):
        GradCAM(model, "blocks.99")
    with pytest.raises(ValueError, match="out of range"):
        GradCAM(model)(torch.rand(1, 1, SIZE, SIZE), target=3)
    with pytest.raises(ValueError, match="2 targets for a batch of 3"):
        GradCAM(model)(torch.rand(3, 1, SIZE, SIZE), target=[0, 1])


def _chest_backgrounds(shared_data: Path, n: int = 48) -> np.ndarray:
    root = shared_data / "gray" / "pretrain" / "chest_xray_pneumonia" / "resized224_rgb"
    files = sorted(root.rglob("*.jp*g"))[:n]
    if len(files) < n:
        pytest.skip(f"need {n} chest X-rays under {root}, found {len(files)}")
    return np.stack([np.asarray(Image.open(f).convert("L").resize((SIZE, SIZE), Image.BILINEAR)) for f in files])


def _planted_batch(backgrounds: np.ndarray, n: int, rng: np.random.Generator):
    """Real X-rays; label 1 = a white square planted at a random place. Returns x, y, masks."""
    x = backgrounds[rng.integers(0, len(backgrounds), n)].astype(np.float32) / 255.0
    y = rng.integers(0, 2, n)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    for i in range(n):
        r, c = rng.integers(0, SIZE - SQUARE, 2)
        masks[i, r : r + SQUARE, c : c + SQUARE] = True
        if y[i]:
            x[i][masks[i]] = 1.0
    return torch.from_numpy((x[:, None] - 0.5) / 0.25), torch.from_numpy(y), masks


def test_cam_finds_planted_square(shared_data):
    """Known answer: a model trained to detect a planted square must light up that square."""
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    backgrounds = _chest_backgrounds(shared_data)
    model = create_model("mednet_test", num_classes=2, drop_rate=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        x, y, _ = _planted_batch(backgrounds, 32, rng)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x, y, masks = _planted_batch(backgrounds, 64, rng)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.9, f"detector did not learn the square (accuracy {accuracy:.2f})"

    positives = y.numpy() == 1
    cams = GradCAM(model, input_size=(SIZE, SIZE))(x[positives], target=1).numpy()  # the default layer
    masks = masks[positives]
    hits = [m.flat[c.argmax()] for c, m in zip(cams, masks)]
    mass = [c[m].sum() / c.sum() for c, m in zip(cams, masks)]
    chance = SQUARE**2 / SIZE**2  # share of the image the square covers
    assert np.mean(hits) >= 0.75, f"CAM peak inside the square for only {np.mean(hits):.0%} of images"
    assert np.mean(mass) >= 4 * chance, f"CAM mass in square {np.mean(mass):.2f} vs chance {chance:.2f}"


def test_overlay_endpoints_are_exact():
    image = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    cam = np.linspace(0, 1, 12 * 10, dtype=np.float32).reshape(12, 10)
    np.testing.assert_array_equal(overlay_cam(image, cam, alpha=0.0), np.repeat(image[..., None], 3, axis=2))
    jet = matplotlib.colormaps["jet"](cam)[..., :3]
    np.testing.assert_array_equal(overlay_cam(image, cam, alpha=1.0), np.rint(jet * 255).astype(np.uint8))
    decoded = np.asarray(Image.open(io.BytesIO(overlay_png(image, cam))))
    np.testing.assert_array_equal(decoded, overlay_cam(image, cam))


def test_overlay_resizes_cam_and_rejects_bad_images():
    image = np.full((40, 30, 3), 200, dtype=np.uint8)
    out = overlay_cam(image, np.ones((4, 3), dtype=np.float32), alpha=1.0)
    assert out.shape == (40, 30, 3)
    assert (out == np.rint(np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255)).all()
    with pytest.raises(ValueError, match="uint8"):
        overlay_cam(image.astype(np.float32), np.ones((4, 3)))


def test_compute_returns_the_logits_of_the_same_pass(model):
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    model.zero_grad(set_to_none=True)  # the pytorch-grad-cam reference calls backward() on this model
    cam, logits = GradCAM(model).compute(x, target=[0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(cam, GradCAM(model)(x, target=[0, 1, 2]), rtol=0, atol=0)
    assert not logits.requires_grad
    assert all(p.grad is None for p in model.parameters()), "CAMs must not leave gradients on the model"


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_exist_only_during_a_call(model):
    import copy
    import io

    cam = GradCAM(model, "blocks.5")
    seen = []
    model.blocks[6].register_forward_hook(lambda *args: seen.append(_hook_count(model)))  # counts mid-forward
    try:
        assert _hook_count(model) == 1  # only the spy
        cam(torch.rand(1, 1, SIZE, SIZE))
        assert seen == [2]  # the CAM hook was there during the forward pass...
        assert _hook_count(model) == 1  # ...and is gone after it
        with pytest.raises(ValueError, match="out of range"):  # raised after the forward pass
            cam(torch.rand(1, 1, SIZE, SIZE), target=7)
        assert _hook_count(model) == 1
    finally:
        model.blocks[6]._forward_hooks.clear()
    copy.deepcopy(model)  # a GradCAM that keeps a hook makes the model unpicklable
    torch.save(model, io.BytesIO())

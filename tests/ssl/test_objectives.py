"""SimCLR objective: lightly's NT-Xent behind our wrapper equals a naive loop over anchors."""

from __future__ import annotations

import math

import pytest
import torch

from openmednet.ssl import SimCLRObjective, build_ssl_objective


def naive_nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> float:
    """NT-Xent of Chen et al. 2020, eq. (1), one anchor at a time (2B anchors, 2B - 1 candidates)."""
    z = torch.nn.functional.normalize(torch.cat([z0, z1]), dim=1).double()
    n, b = len(z), len(z0)
    total = 0.0
    for i in range(n):
        positive = (i + b) % n
        sims = {j: float(z[i] @ z[j]) / temperature for j in range(n) if j != i}
        total += -sims[positive] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / n


@pytest.mark.parametrize("temperature,batch", [(0.1, 4), (0.5, 7)])
def test_simclr_loss_equals_naive_loop(temperature: float, batch: int):
    torch.manual_seed(0)
    objective = SimCLRObjective(in_dim=16, hidden_dim=32, out_dim=8, temperature=temperature).eval()
    features = torch.randn(2 * batch, 16)
    with torch.no_grad():
        loss = objective(features, n_views=2)
        z0, z1 = objective.head(features).chunk(2)
    assert loss.item() == pytest.approx(naive_nt_xent(z0, z1, temperature), rel=1e-5)


def test_loss_is_float32_under_bf16_autocast():
    objective = SimCLRObjective(in_dim=16, hidden_dim=32, out_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective(torch.randn(8, 16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_bad_inputs_and_names():
    objective = SimCLRObjective(in_dim=4)
    with pytest.raises(ValueError, match="exactly 2 views"):
        objective(torch.randn(9, 4), n_views=3)
    with pytest.raises(KeyError, match="did you mean 'simclr'"):
        build_ssl_objective("simclrr", 4)
    with pytest.raises(ValueError, match="temperature"):
        SimCLRObjective(in_dim=4, temperature=0.0)

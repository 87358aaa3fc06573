"""FreeMatch (issue 12): the self-adaptive threshold and fairness term computed by hand, a run end to
end on a tiny real brain MRI target, and earlier runs staying valid after its fields were added."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from openmednet.config import to_dict
from openmednet.eval.finetune import FinetuneConfig, run_finetune
from openmednet.eval.finetune._resume import result_config
from openmednet.eval.freematch import SelfAdaptiveThreshold, fairness_loss
from openmednet.eval.semi import FixMatchLoss, semi_neutral


@pytest.fixture(scope="module")
def tiny(brain_subset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return brain_subset(tmp_path_factory.mktemp("freematch"))


def test_class_thresholds_follow_the_models_confidence() -> None:
    sat = SelfAdaptiveThreshold(2, momentum=0.5)
    assert sat.class_thresholds.tolist() == [0.5, 0.5]  # 1/K before any batch (eq. 5-6 at t=0)
    mask = sat(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64))
    # tau = 0.5*0.5 + 0.5*mean(0.9, 0.6, 0.7); p = 0.5*[0.5, 0.5] + 0.5*[0.6, 0.4] = [0.55, 0.45]
    tau = 0.25 + 0.5 * (0.9 + 0.6 + 0.7) / 3
    assert sat.tau.item() == pytest.approx(tau, abs=1e-12)
    assert sat.class_thresholds.tolist() == pytest.approx([tau, tau * 0.45 / 0.55], abs=1e-12)
    assert sat.label_hist.tolist() == pytest.approx([0.5 * 0.5 + 0.5 * 2 / 3, 0.5 * 0.5 + 0.5 / 3], abs=1e-12)
    # 0.6 misses class 0's bar (0.617); 0.7 clears the lower bar of the class predicted less (0.505)
    assert mask.tolist() == [1.0, 0.0, 1.0]


def test_a_confident_model_raises_the_bar_and_momentum_zero_is_the_batch_mean() -> None:
    sat = SelfAdaptiveThreshold(3, momentum=0.9)
    sure = torch.tensor([[0.98, 0.01, 0.01]] * 4)
    before = sat.tau.item()
    for _ in range(20):
        sat(sure)
    assert before < sat.tau.item() < 0.98 and sat.class_thresholds.argmax().item() == 0
    batch = SelfAdaptiveThreshold(2, momentum=0.0)
    assert batch(torch.tensor([[0.8, 0.2], [0.6, 0.4]])).tolist() == [1.0, 0.0]  # tau = 0.7, p = [0.7, 0.3]
    with pytest.raises(ValueError, match="momentum"):
        SelfAdaptiveThreshold(2, momentum=1.0)


def test_fairness_term_matches_the_formula_and_weights_absent_classes_zero() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], requires_grad=True)
    p_model, label_hist = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.6, 0.4, 0.0])
    loss = fairness_loss(probs, p_model, label_hist)
    # strong-view argmax histogram [2/3, 1/3, 0]; class 2 is absent from both histograms -> weight 0
    target = [0.5 / 0.6, 0.3 / 0.4, 0.0]
    target = [t / sum(target) for t in target]
    mean = [0.5 * 3 / 2, 1 / 3 * 3, 0.0]  # column means / histogram
    mean = [m / sum(mean) for m in mean]
    assert loss.item() == pytest.approx(sum(t * math.log(m + 1e-12) for t, m in zip(target, mean)), abs=1e-6)
    loss.backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0


def test_fixed_threshold_has_no_fairness_term() -> None:
    with pytest.raises(ValueError, match="self-adaptive"):
        FixMatchLoss(None, 0.95, 1.0, 2, lambda_f=0.01)


def _cfg(data: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(data=data, out=out, init="scratch:mednet_test", epochs=2, patience=2, image_size=32, batch_size=8,
                lr=1e-3, n_boot=0, max_side=64, given_splits=False, test_fraction=0.25, per_class=3,
                unlabelled=("rest_of_train",))
    return FinetuneConfig(**{**base, **kw})


def test_freematch_accepts_more_than_fixmatch_from_the_same_start(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = tiny
    fix = run_finetune(_cfg(data, tmp_path / "fix", semi="fixmatch")).metrics["semi"]
    free = run_finetune(_cfg(data, tmp_path / "free", semi="freematch")).metrics["semi"]
    assert free["method"] == "freematch" and free["threshold"] == "self_adaptive"
    assert free["unlabelled_seen"] == fix["unlabelled_seen"] > 0  # same schedule and batches
    # an untrained model is nowhere near 0.95 confident; FreeMatch's bar starts at 1/K
    assert fix["mask_rate"] < 0.2 < free["mask_rate"]
    assert set(free["final_threshold_per_class"]) == {"no", "yes"}
    assert all(0 < t < 1 for t in free["final_threshold_per_class"].values())


def test_runs_made_before_freematch_fields_existed_are_the_same_runs(tmp_path: Path) -> None:
    now = to_dict(FinetuneConfig(data=tmp_path, out=tmp_path, semi="fixmatch", unlabelled=("rest_of_train",)))
    before = {k: v for k, v in now.items() if k not in ("sat_momentum", "lambda_f")}
    precision = ("fp32", False)
    assert result_config(before, precision) == result_config(now, precision)
    free = {**now, "semi": "freematch"}
    assert semi_neutral(free)["sat_momentum"] == 0.9  # FreeMatch's own runs compare on them
    assert result_config({**free, "lambda_f": 0.0}, precision) != result_config(free, precision)


@pytest.mark.parametrize(("field", "value"), [("lambda_f", math.nan), ("lambda_f", math.inf), ("lambda_u", math.nan),
                                              ("lambda_u", math.inf), ("lambda_f", -1.0), ("sat_momentum", 1.0)])
def test_loss_weights_must_be_finite(tmp_path: Path, field: str, value: float) -> None:
    # Regression (hostile-user probe): --set lambda_f=nan (or inf, or lambda_u=nan) passed the ">= 0"
    # check and the run stopped at its first step with a NonFiniteLossError traceback.
    with pytest.raises(ValueError, match=rf"need .*{field}"):
        FinetuneConfig(data=tmp_path, out=tmp_path, semi="freematch", unlabelled=("rest_of_train",), **{field: value})

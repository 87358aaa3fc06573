"""``precision="auto"``: bf16 + channels_last where the hardware runs bf16 natively, fp32 elsewhere.

Both branches run on any machine: the capability probe is patched.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from openmednet.config import to_dict
from openmednet.engine import precision as precision_mod
from openmednet.engine.precision import (
    PRECISIONS,
    SlowPrecisionWarning,
    bf16_support,
    cpu_capability,
    resolve_precision,
)
from openmednet.engine.trainer import autocast


@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch):
    """Set whether the CPU 'has' native bf16; the warn-once memory starts empty."""
    precision_mod._warn_emulated_bf16.cache_clear()

    def set_native(native: bool) -> None:
        monkeypatch.setattr(precision_mod, "_cpu_bf16_native", lambda: native)

    yield set_native
    precision_mod._warn_emulated_bf16.cache_clear()


def test_auto_is_bf16_channels_last_where_native(cpu_bf16) -> None:
    cpu_bf16(True)
    assert resolve_precision("auto", "cpu") == ("bf16", True)
    assert resolve_precision("auto", "cpu", channels_last=False) == ("bf16", False)  # explicit layout wins
    with autocast(torch.device("cpu"), "auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_auto_is_fp32_without_native_bf16_and_does_not_warn(cpu_bf16) -> None:
    cpu_bf16(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("auto", "cpu") == ("fp32", False)
        with autocast(torch.device("cpu"), "auto"):
            assert not torch.is_autocast_enabled("cpu")


def test_explicit_bf16_on_emulating_cpu_warns_once_with_the_cost(cpu_bf16) -> None:
    cpu_bf16(False)
    with pytest.warns(SlowPrecisionWarning, match=r"about 9x slower than fp32") as record:
        assert resolve_precision("bf16", "cpu") == ("bf16", True)
        assert resolve_precision("bf16", "cpu") == ("bf16", True)  # every epoch asks again: one warning
    assert len([w for w in record if issubclass(w.category, SlowPrecisionWarning)]) == 1
    assert "auto" in str(record[0].message) and cpu_capability() in str(record[0].message)


def test_explicit_bf16_on_native_cpu_is_silent(cpu_bf16) -> None:
    cpu_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cpu") == ("bf16", True)


def test_fp32_fp16_and_unknown(cpu_bf16) -> None:
    cpu_bf16(True)
    assert resolve_precision("fp32", "cpu") == ("fp32", False)
    assert resolve_precision("fp32", "cpu", channels_last=True) == ("fp32", True)
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(KeyError, match="did you mean 'bf16'"):
        resolve_precision("bf61", "cpu")
    assert PRECISIONS[0] == "auto"


@pytest.mark.parametrize("native", [True, False])
def test_cuda_asks_torch_cuda(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    assert bf16_support("cuda")[0] is native
    assert resolve_precision("auto", "cuda") == (("bf16", True) if native else ("fp32", False))


def test_the_real_probe_answers() -> None:
    # Whatever this machine is, the probe gives a bool and names the CPU capability torch reports.
    native, description = bf16_support("cpu")
    assert isinstance(native, bool) and cpu_capability() in description


def test_finetune_config_defaults_to_auto() -> None:
    from openmednet.eval.finetune import FinetuneConfig

    cfg = FinetuneConfig(data="d", out="o")
    assert cfg.precision == "auto" and cfg.channels_last is None


@pytest.mark.parametrize("native", [True, False])
def test_study_reuses_an_explicit_bf16_arm_only_where_auto_means_bf16(cpu_bf16, tmp_path, native: bool) -> None:
    # A study arm finished with the old explicit 'bf16 + channels_last' recipe is the same run as
    # 'auto' on a CPU with native bf16, and a different one where 'auto' means fp32.
    from openmednet.eval.finetune import FinetuneConfig
    from openmednet.eval.study import _done

    cpu_bf16(native)
    old = FinetuneConfig(data=tmp_path, out=tmp_path / "arm", precision="bf16", channels_last=True, device="cpu")
    (tmp_path / "arm").mkdir()
    (tmp_path / "arm/metrics.json").write_text(json.dumps({"config": to_dict(old), "model": {}}))
    new = FinetuneConfig(data=tmp_path, out=tmp_path / "arm", device="cpu")
    if native:
        assert _done(new) is not None
    else:
        with pytest.raises(ValueError, match="different configuration"):
            _done(new)

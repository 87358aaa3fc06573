"""``InitSpec``: the init grammar ``auto | scratch:arch[.tag] | name[.tag] | path``, parsed in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from openmednet.models import InitSpec


@pytest.mark.parametrize(
    ("text", "kind", "name", "arch", "tag"),
    [
        ("auto", "auto", None, None, None),
        ("scratch:mednet_gray", "scratch", "mednet_gray", "mednet_gray", None),
        ("scratch:mednet_gray.sup_cpu64_v1", "scratch", "mednet_gray.sup_cpu64_v1", "mednet_gray", "sup_cpu64_v1"),
        ("efficientnet_lite0", "pretrained", "efficientnet_lite0", "efficientnet_lite0", None),
        ("mednet_color.comb_cpu64_v1", "pretrained", "mednet_color.comb_cpu64_v1", "mednet_color", "comb_cpu64_v1"),
        ("resnet50.a1_in1k", "pretrained", "resnet50.a1_in1k", "resnet50", "a1_in1k"),
        (" auto ", "auto", None, None, None),  # YAML / shell whitespace
    ],
)
def test_grammar(text: str, kind: str, name: str | None, arch: str | None, tag: str | None) -> None:
    spec = InitSpec.parse(text)
    assert (spec.kind, spec.name, spec.arch, spec.tag, spec.path) == (kind, name, arch, tag, None)
    assert spec.pretrained is (kind != "scratch")
    assert spec.text == text.strip()


def test_existing_paths_win_and_missing_paths_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert InitSpec.parse(str(tmp_path / "run" / "model")) == InitSpec("path", path=tmp_path / "run" / "model",
                                                                      text=str(tmp_path / "run" / "model"))
    assert InitSpec.parse(tmp_path / "w.safetensors").kind == "path"
    # A bare folder name in the working directory is a path too (`openmednet predict model scans/`);
    # one named like a registered model is ambiguous (test_a_folder_named_like_a_registered_model...).
    monkeypatch.chdir(tmp_path / "run")
    assert InitSpec.parse("model").kind == "path"
    for missing in ("runs/nothing/here", "weights.safetensors", "card.json", "old.pth", "C:\\w\\m.pt"):
        with pytest.raises(FileNotFoundError, match="init weights not found"):
            InitSpec.parse(missing)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty init"),
        ("scratch:", "expected scratch:<arch>"),
        ("scratch:mednet gray", "expected scratch:<arch>"),
        ("imagenet:resnet50", "unknown prefix 'imagenet:'.*efficientnet_lite0"),
        ("pretrained:mednet_gray", "unknown prefix 'pretrained:'"),
        ("mednet_gray..v1", "not a model name"),
        ("-mednet", "not a model name"),
    ],
)
def test_malformed_inits_say_what_is_expected(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InitSpec.parse(text)


def test_auto_resolves_by_channels_everywhere() -> None:
    auto = InitSpec.parse("auto")
    assert auto.resolve(1) == InitSpec("pretrained", name="mednet_gray", text="auto")
    assert auto.resolve(3) == InitSpec("pretrained", name="mednet_color", text="auto")
    with pytest.raises(ValueError, match="1 \\(gray\\) or 3 \\(colour\\) channels, got 4"):
        auto.resolve(4)
    named = InitSpec.parse("scratch:mednet_gray")
    assert named.resolve(3) is named  # only auto depends on the target


def test_study_and_leakage_agree_on_auto_for_colour_targets() -> None:
    # The study used to map 'auto' to mednet_gray for every target; the leakage check chose by
    # channels. Both now ask InitSpec: on a colour target, auto is mednet_color's weights and corpus.
    from openmednet.eval.leakage import shipped_corpus_fingerprint
    from openmednet.eval.study import _needs_corpus
    from openmednet.models import corpus_fingerprint_file, get_pretrained_cfg

    if get_pretrained_cfg("mednet_color", allow_missing=True) is None:
        pytest.skip("no shipped Color-MedNet weights installed")
    assert _needs_corpus("auto", 3) and _needs_corpus("auto", 1)
    assert not _needs_corpus("scratch:mednet_color", 3) and not _needs_corpus("efficientnet_lite0", 3)
    assert shipped_corpus_fingerprint("auto", 3) == corpus_fingerprint_file("mednet_color")
    assert shipped_corpus_fingerprint("auto", 1) == corpus_fingerprint_file("mednet_gray")


@pytest.mark.parametrize("init", ["auto", "scratch:mednet_test"])
def test_prediction_refuses_inits_that_name_no_trained_model(init: str) -> None:
    from openmednet.serve.predictor import load_model

    with pytest.raises(ValueError, match=f"not which trained model to use.*--init {init} --out runs/x"):
        load_model(init)


def test_a_folder_named_like_a_registered_model_is_ambiguous(tmp_path, monkeypatch):
    """Review finding: ``--init resnet18`` silently loaded ./resnet18/ when such a run folder existed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").mkdir()
    with pytest.raises(ValueError, match=r"both a registered model and a folder .* write ./resnet18"):
        InitSpec.parse("resnet18")
    assert InitSpec.parse("./resnet18").kind == "path"
    (tmp_path / "my_run").mkdir()  # not a model name: a plain path, as before
    assert InitSpec.parse("my_run").kind == "path"

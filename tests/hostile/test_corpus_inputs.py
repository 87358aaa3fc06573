"""Issue 14, hostile input to ``openmednet corpus build``: each test reproduces one probe.

Sources are small folders of real images copied from ../shared/data into ``tmp_path`` (the
probe's exact shapes, names and links are made there); the kill test builds from a real folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from openmednet.cli.app import app
from openmednet.data.corpus import CorpusWarning, build_corpus
from openmednet.data.shards import CorpusArrays
from openmednet.data.sources import SourceSpec, iter_source

runner = CliRunner()


def _copy_images(src: Path, dst: Path, n: int, start: int = 0) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.jpg"))[start : start + n]
    return [Path(shutil.copy(f, dst / f.name)) for f in files]


@pytest.fixture()
def gray_dir(shared_data: Path, tmp_path: Path) -> Path:
    """8 real chest X-rays in a flat folder."""
    _copy_images(shared_data / "gray/pretrain/covid_cxr_figure1/images", tmp_path / "gray", 8)
    return tmp_path / "gray"


@pytest.fixture()
def colour_dirs(shared_data: Path, tmp_path: Path) -> list[Path]:
    """Seven colour pools (the probe's shape) of 4 real dermoscopy images each, plus one gray pool."""
    ham = shared_data / "color/pretrain/ham10000/images"
    dirs = [tmp_path / f"colour{k}" for k in range(7)]
    for k, d in enumerate(dirs):
        _copy_images(ham, d, 4, start=4 * k)
    return dirs


def _build(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["corpus", "build", *map(str, args), "--size", "32", "--workers", "1"])
    return result.exit_code, result.output + (str(result.exception) if result.exception else "")


def _skips(manifest) -> dict[str, int]:
    return manifest.stats["skipped"]


# --- item 2: --exclude with several values, targets as sources, channels -------------------------


def test_bare_exclude_list_is_refused_before_anything_is_written(shared_data: Path, gray_dir: Path, tmp_path: Path):
    """Probe: '--exclude A B C' made B and C pre-training sources, with no warning."""
    targets = shared_data / "gray/targets"
    code, out = _build(gray_dir, "--out", tmp_path / "c", "--exclude", targets / "openi_abd_vs_cxr",
                       targets / "busi", targets / "brain_mri_yes_no")
    assert code != 0
    assert "read as pre-training SOURCES" in out and "--exclude" in out and "busi," in out.replace("\n", "")
    assert not (tmp_path / "c").exists()


def test_comma_separated_exclude_keeps_every_target_out(gray_dir: Path, tmp_path: Path):
    images = sorted(gray_dir.iterdir())
    for name, picks in (("t1", images[:2]), ("t2", images[2:3])):
        (tmp_path / name).mkdir()
        for p in picks:
            shutil.copy(p, tmp_path / name / p.name)
    code, out = _build(gray_dir, "--out", tmp_path / "c", "--exclude", f"{tmp_path / 't1'},{tmp_path / 't2'}")
    assert code == 0, out
    manifest = CorpusArrays(tmp_path / "c").manifest
    assert manifest.num_images == 5
    assert manifest.stats["exclusion"]["targets"] == {"t1": {"gray": 2}, "t2": {"gray": 1}}


def test_a_source_that_is_an_exclusion_target_is_refused(gray_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="must never be a pre-training source"):
        build_corpus([SourceSpec("g", gray_dir)], tmp_path / "c", channels=1, exclude=[SourceSpec("t", gray_dir)])
    sub = gray_dir / "sub"
    sub.mkdir()
    shutil.copy(next(gray_dir.glob("*.jpg")), sub)
    with pytest.raises(ValueError, match="inside the exclusion target"):
        build_corpus([SourceSpec("s", sub)], tmp_path / "c", channels=1, exclude=[SourceSpec("t", gray_dir)])
    assert not (tmp_path / "c").exists()


def test_sources_next_to_a_target_or_holding_a_test_split_are_warned(shared_data: Path, gray_dir: Path, tmp_path: Path):
    targets = tmp_path / "targets"
    openi = shared_data / "gray/targets/openi_abd_vs_cxr"
    shutil.copytree(openi, targets / "openi")  # labels.csv with TRAIN/VAL/TEST
    shutil.copytree(gray_dir, targets / "other")
    with pytest.warns(CorpusWarning) as caught:
        build_corpus([SourceSpec("openi", targets / "openi")], tmp_path / "c", channels=1, image_size=16,
                     exclude=[SourceSpec("other", targets / "other")])
    messages = " | ".join(str(w.message) for w in caught)
    assert "sits next to the exclusion target 'other'" in messages
    assert re.search(r"'openi' holds \d+ images in a test split", messages)


def test_channels_default_follows_the_sources(colour_dirs: list[Path], tmp_path: Path):
    """Probe: seven colour pools without --channels 3 kept 48 images and skipped 4,416 (exit 0)."""
    code, out = _build(*colour_dirs, "--out", tmp_path / "c")
    assert code == 0, out
    manifest = CorpusArrays(tmp_path / "c").manifest
    assert manifest.channels == 3 and manifest.num_images == 28 and "wrong_channels" not in _skips(manifest)
    assert manifest.build["channels_requested"] == "auto"


def test_explicit_channels_that_would_skip_most_input_fail_with_the_fix(colour_dirs: list[Path], tmp_path: Path):
    code, out = _build(*colour_dirs, "--out", tmp_path / "c", "--channels", "1")
    assert code != 0
    assert "would be skipped as wrong_channels" in out and "--channels 3" in out
    code, out = _build(*colour_dirs, "--out", tmp_path / "c", "--channels", "3")  # same --out: nothing to delete
    assert code == 0, out


def test_auto_channels_build_equals_the_explicit_one(gray_dir: Path, tmp_path: Path):
    assert _build(gray_dir, "--out", tmp_path / "auto")[0] == 0
    assert _build(gray_dir, "--out", tmp_path / "one", "--channels", "1")[0] == 0
    for name in ("shard-00000/images.npy", "shard-00000/meta.npz", "shard-00000/records.jsonl"):
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_a_source_of_the_other_family_is_warned(gray_dir: Path, colour_dirs: list[Path], tmp_path: Path):
    with pytest.warns(CorpusWarning, match="'colour0' looks colour"):
        manifest = build_corpus([SourceSpec("gray", gray_dir), SourceSpec("colour0", colour_dirs[0])],
                                tmp_path / "c", channels="auto", image_size=16)
    assert manifest.channels == 1 and _skips(manifest) == {"wrong_channels": 4}


# --- item 4: file names that are not UTF-8 -------------------------------------------------------


def _bad_name(folder: Path, good: Path) -> Path:
    path = Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.jpg"))
    shutil.copy(good, path)
    return path


def test_non_utf8_name_is_one_reported_skip(gray_dir: Path, tmp_path: Path):
    """Probe: a non-UTF-8 name aborted the build ('surrogates not allowed', the file not named)."""
    _bad_name(gray_dir, next(gray_dir.glob("*.jpg")))
    code, out = _build(gray_dir, "--out", tmp_path / "c")
    assert code == 0, out
    manifest = CorpusArrays(tmp_path / "c").manifest
    assert manifest.num_images == 8 and _skips(manifest) == {"bad_file_name": 1}
    (example,) = manifest.stats["skip_examples"]["bad_file_name"]
    assert "caf\\xe9.jpg" in example
    assert "bad_file_name" in (tmp_path / "c/report.md").read_text()


def test_interrupted_build_with_a_non_utf8_name_resumes(gray_dir: Path, tmp_path: Path):
    """Probe: the resume kept failing because the saved plan holds the name."""
    _bad_name(gray_dir, next(gray_dir.glob("*.jpg")))

    def stop(stage: str, done: int, total: int) -> None:
        if stage == "decode" and done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_corpus([SourceSpec("g", gray_dir)], tmp_path / "c", channels=1, image_size=16, chunk_items=2,
                     progress=stop)
    assert (tmp_path / "c/.build/plan.jsonl").is_file()
    manifest = build_corpus([SourceSpec("g", gray_dir)], tmp_path / "c", channels=1, image_size=16, chunk_items=2)
    assert manifest.num_images == 8 and _skips(manifest) == {"bad_file_name": 1}


def test_non_utf8_name_in_a_split_build(gray_dir: Path, tmp_path: Path):
    _bad_name(gray_dir, next(gray_dir.glob("*.jpg")))
    counts = []
    for part in (0, 1):
        m = build_corpus([SourceSpec("g", gray_dir)], tmp_path / f"p{part}", channels=1, image_size=16, num_parts=2,
                         part=part)
        counts.append(m.num_images + sum(_skips(m).values()))
    assert sum(counts) == 9


def test_predict_folder_with_a_non_utf8_name_writes_the_good_rows(gray_dir: Path, tmp_path: Path):
    """Probe: predict DIR on a folder holding one such name wrote no CSV (40 good predictions lost)."""
    import torch

    from openmednet import create_model
    from openmednet.export.safetensors import export_safetensors

    torch.manual_seed(0)
    export_safetensors(create_model("mednet_test", num_classes=2).eval(), tmp_path / "model", label_names=("a", "b"))
    _bad_name(gray_dir, next(gray_dir.glob("*.jpg")))
    result = runner.invoke(app, ["predict", str(tmp_path / "model"), str(gray_dir), "--out", str(tmp_path / "p.csv")])
    # the exit code may flag the skipped file; what matters is that the good rows are written
    assert (tmp_path / "p.csv").is_file(), result.output
    assert "bad_file_name" in result.output
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 and not any("caf" in r for r in rows)


# --- item 5: workers die with the build ----------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its reaping is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_when_the_build_is_killed(shared_data: Path, tmp_path: Path):
    """Probe: corpus build --workers 2 killed with SIGKILL left both workers running for minutes."""
    cmd = [sys.executable, "-m", "openmednet", "corpus", "build", str(shared_data / "gray/pretrain/knee_oa"),
           "--out", str(tmp_path / "c"), "--channels", "1", "--size", "32", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 600  # importing torch alone took 70 s on the loaded 2-core machine
        while len(workers := _children(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the build ended before its workers started"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in _children(proc.pid):
            os.kill(w, signal.SIGKILL)


# --- item 6: labels.csv paths and symlinks that leave the source folder ------------------------------


@pytest.fixture()
def escaping_source(gray_dir: Path, tmp_path: Path) -> Path:
    """A labels.csv source with 2 images of its own, ../x.png, an absolute path and a symlink out."""
    images = sorted(gray_dir.glob("*.jpg"))
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    for p in images[:2]:
        shutil.copy(p, src / "img" / p.name)
    shutil.copy(images[2], tmp_path / "x.jpg")
    os.symlink(images[3], src / "img" / "link.jpg")
    rows = ["path,label", f"img/{images[0].name},a", f"img/{images[1].name},a", "../x.jpg,b", f"{images[4]},b",
            "img/link.jpg,b"]
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    return src


def test_paths_outside_the_source_folder_are_skipped(escaping_source: Path, tmp_path: Path):
    """Probe: ../x.png and absolute paths were read into the corpus; symlinks out were followed."""
    manifest = build_corpus([SourceSpec("s", escaping_source)], tmp_path / "c", channels=1, image_size=16)
    assert manifest.num_images == 2 and _skips(manifest) == {"outside_root": 3}
    assert all("outside the source folder" in e for e in manifest.stats["skip_examples"]["outside_root"])


def test_paths_outside_the_folder_with_the_explicit_option(escaping_source: Path, tmp_path: Path):
    code, out = _build(escaping_source, "--out", tmp_path / "c", "--allow-outside-root")
    assert code == 0, out
    manifest = CorpusArrays(tmp_path / "c").manifest
    assert manifest.num_images == 5 and _skips(manifest) == {}


def test_symlinked_folder_out_of_the_source_is_skipped(gray_dir: Path, tmp_path: Path):
    src = tmp_path / "classes"
    (src / "a").mkdir(parents=True)
    shutil.copy(next(gray_dir.glob("*.jpg")), src / "a")
    os.symlink(gray_dir, src / "b")  # a class folder that is elsewhere
    manifest = build_corpus([SourceSpec("s", src)], tmp_path / "c", channels=1, image_size=16)
    assert manifest.num_images == 1 and _skips(manifest) == {"outside_root": 8}


# --- item 9: links, tiny and blank images, a latin-1 labels.csv ------------------------------------


def test_symlink_loop_and_tiny_and_blank_images_are_reported(gray_dir: Path, tmp_path: Path):
    os.symlink("loop.png", gray_dir / "loop.png")
    Image.new("L", (1, 1), 200).save(gray_dir / "one_pixel.png")
    Image.new("L", (64, 64), 0).save(gray_dir / "blank.png")
    Image.new("RGB", (64, 64), (90, 20, 20)).save(gray_dir / "blank_colour.png")
    manifest = build_corpus([SourceSpec("g", gray_dir)], tmp_path / "c", channels=1, image_size=16)
    assert manifest.num_images == 8
    assert _skips(manifest) == {"broken_link": 1, "too_small": 1, "blank_image": 2}


def test_latin1_labels_csv_error_names_the_file(gray_dir: Path, tmp_path: Path):
    name = next(gray_dir.glob("*.jpg")).name
    (gray_dir / "labels.csv").write_bytes(f"path,label\n{name},\xe9panchement\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"labels\.csv is not UTF-8.*iconv"):
        list(iter_source(SourceSpec("g", gray_dir)))
    code, out = _build(gray_dir, "--out", tmp_path / "c")
    assert code != 0 and str(gray_dir / "labels.csv") in out.replace("\n", "")


def test_hostile_items_leave_good_input_byte_identical(gray_dir: Path, tmp_path: Path):
    """The clean folder's corpus is the same with and without the hostile neighbours (all skipped)."""
    clean = build_corpus([SourceSpec("g", gray_dir)], tmp_path / "clean", channels=1, image_size=16)
    os.symlink("loop.png", gray_dir / "loop.png")
    Image.new("L", (100_000, 1)).save(gray_dir / "strip.png")
    Image.new("L", (1, 1)).save(gray_dir / "z_tiny.png")
    _bad_name(gray_dir, next(gray_dir.glob("*.jpg")))
    dirty = build_corpus([SourceSpec("g", gray_dir)], tmp_path / "dirty", channels=1, image_size=16)
    assert dirty.num_images == clean.num_images == 8
    assert sum(_skips(dirty).values()) == 4
    a, b = CorpusArrays(tmp_path / "clean"), CorpusArrays(tmp_path / "dirty")
    np.testing.assert_array_equal(a._images(0), b._images(0))
    assert [json.dumps(r) for r in a.records(0)] == [json.dumps(r) for r in b.records(0)]


def test_a_source_without_a_path_or_a_name_is_refused(gray_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Regression: 'knee=' (the path forgotten) built a corpus of the working directory, and '.' a
    # source named '' (the manifest's and report's name for it).
    monkeypatch.chdir(gray_dir)
    code, out = _build("knee=", "--out", tmp_path / "c1")
    assert code != 0 and "source 'knee=' names no path" in out and not (tmp_path / "c1").exists()
    code, out = _build(".", "--out", tmp_path / "c2")
    assert code == 0, out
    assert [s["name"] for s in json.loads((tmp_path / "c2" / "manifest.json").read_text())["sources"]] == ["gray"]


def test_an_out_folder_inside_a_source_is_refused_before_anything_is_written(gray_dir: Path):
    # Regression (hostile-user probe): 'corpus build SRC --out SRC/corpus' (or --out SRC) put the
    # corpus's report figures among SRC's images: a later build of SRC read them (3 colour PNGs,
    # kept as pre-training images with --channels 3).
    before = sorted(p.name for p in gray_dir.iterdir())
    for out in (gray_dir / "corpus", gray_dir):
        with pytest.raises(ValueError, match=r"is (inside )?the source folder 'g' .*choose an --out outside every source"):
            build_corpus([SourceSpec("g", gray_dir)], out, channels=1, image_size=16)
    assert sorted(p.name for p in gray_dir.iterdir()) == before

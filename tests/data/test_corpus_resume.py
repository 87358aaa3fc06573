"""Resumption after SIGKILL, split builds (--num-parts/--part) and merge, and the corpus CLI."""

from __future__ import annotations

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
from typer.testing import CliRunner

from openmednet.cli.app import app
from openmednet.data.corpus import build_corpus
from openmednet.data.corpus._plan import BuildParams, check_params, item_part
from openmednet.data.shards import CorpusArrays, complete_shards
from openmednet.data.sources import SourceItem, SourceSpec, iter_source

# The child builds with a pause after each decode task or shard write so that the kill lands in
# the middle of that stage; the pause changes timing only, not what is written.
_CHILD = """
import sys, time
from pathlib import Path
from openmednet.data.corpus import _decode, _write, build_corpus
from openmednet.data.sources import SourceItem, SourceSpec, iter_source
stage, root, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
module, name = (_decode, "process_chunk") if stage == "decode" else (_write, "write_shard")
slow = getattr(module, name)
def paused(*args, **kwargs):
    result = slow(*args, **kwargs)
    time.sleep(0.25)
    return result
setattr(module, name, paused)
build_corpus([SourceSpec("covid", Path(root))], Path(out), channels=1, image_size=32, workers=workers, shard_size=4, chunk_items=8)
"""

BUILD_ARGS = {"channels": 1, "image_size": 32, "workers": 1, "shard_size": 4, "chunk_items": 8}


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(
                f"the build finished (rc={proc.returncode}) before it could be killed:\n{proc.stderr.read().decode()}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the build made no progress")
        time.sleep(0.02)


def _assert_same_corpus(a: Path, b: Path) -> None:
    x, y = CorpusArrays(a), CorpusArrays(b)
    assert len(x) == len(y) > 0
    assert [s.__dict__ for s in x.manifest.shards] == [s.__dict__ for s in y.manifest.shards]
    for key in ("label", "source", "split", "group", "phash"):
        np.testing.assert_array_equal(getattr(x, key), getattr(y, key))
    for i in range(len(x)):
        np.testing.assert_array_equal(x.image(i), y.image(i))
    assert list(x.iter_records()) == list(y.iter_records())


@pytest.fixture(scope="module")
def reference(shared_data, tmp_path_factory):
    """An uninterrupted build of covid_cxr_figure1 (55 images, 14 shards of 4)."""
    root = shared_data / "gray/pretrain/covid_cxr_figure1"
    out = tmp_path_factory.mktemp("ref") / "corpus"
    build_corpus([SourceSpec("covid", root)], out, **BUILD_ARGS)
    return root, out


# 2 workers, killed while writing: the report is then counted and drawn in another process
@pytest.mark.parametrize(("stage", "workers"), [("decode", 1), ("write", 1), ("write", 2)])
def test_resume_after_sigkill_equals_uninterrupted_build(reference, tmp_path, stage, workers):
    root, ref = reference
    out = tmp_path / "corpus"
    env = dict(os.environ, OPENMEDNET_TEST_THREADS="1")
    args = [sys.executable, "-c", _CHILD, stage, str(root), str(out), str(workers)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, env=env)
    if stage == "decode":
        _wait_for(lambda: len(list((out / ".build" / "chunks").glob("chunk-*.npz"))) >= 2, proc)
    else:
        _wait_for(lambda: len(complete_shards(out)) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "manifest.json").exists()  # killed mid-way: no corpus visible yet
    if stage == "write":
        assert 3 <= len(complete_shards(out)) < 14
    build_corpus([SourceSpec("covid", root)], out, **BUILD_ARGS)
    _assert_same_corpus(ref, out)


def test_resume_refuses_other_parameters(reference, tmp_path):
    root, _ = reference
    out = tmp_path / "corpus"
    (out / ".build").mkdir(parents=True)
    build_args = dict(BUILD_ARGS)
    # a params file from an unfinished build with another image size
    check_params(out / ".build", BuildParams(1, 64, "pad", 6, 0, 4, 1, 0, 8, [], []))
    with pytest.raises(ValueError, match="unfinished build with different parameters"):
        build_corpus([SourceSpec("covid", root)], out, **build_args)


def test_cli_parts_merge_equal_a_single_build(reference, tmp_path):
    root, _ = reference
    # a second source holding a byte copy of a covid image, placed in the other part than the
    # original, so only the merge can see the duplicate
    original = next(iter_source(SourceSpec("covid", root)))
    original_part = item_part(original, 2)
    copies = tmp_path / "copies"
    copies.mkdir()
    name = next(
        f"copy_{k}.jpg"
        for k in range(1000)
        if item_part(SourceItem(copies / f"copy_{k}.jpg", source="copies"), 2) != original_part
    )
    shutil.copy(original.path, copies / name)

    runner = CliRunner()
    common = ["--channels", "1", "--size", "32", "--workers", "1", "--shard-size", "16"]
    for part in (0, 1):
        res = runner.invoke(
            app,
            [
                "corpus",
                "build",
                str(root),
                f"copies={copies}",
                "--out",
                str(tmp_path / f"p{part}"),
                *common,
                "--num-parts",
                "2",
                "--part",
                str(part),
            ],
        )
        assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["corpus", "merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "merged")]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["corpus", "inspect", str(tmp_path / "merged")])
    assert res.exit_code == 0 and "images" in res.output

    single = tmp_path / "single"
    build_corpus(
        [SourceSpec("covid", root), SourceSpec("copies", copies)],
        single,
        channels=1,
        image_size=32,
        workers=1,
        shard_size=16,
    )
    merged, whole = CorpusArrays(tmp_path / "merged"), CorpusArrays(single)
    assert sum(len(CorpusArrays(tmp_path / f"p{p}")) for p in (0, 1)) == len(whole) + 1  # parts keep both copies
    assert len(merged) == len(whole)
    assert sorted(r["sha1"] for r in merged.iter_records()) == sorted(r["sha1"] for r in whole.iter_records())
    assert merged.manifest.stats["dropped"] == {"duplicate_exact": 1}
    assert [p["images"] for p in merged.manifest.stats["parts"]] == [
        len(CorpusArrays(tmp_path / f"p{p}")) for p in (0, 1)
    ]

    # Regression: a part given twice (the same folder, or a copy of it) merged silently, its second
    # copy dropped as exact duplicates, exit 0.
    shutil.copytree(tmp_path / "p0", tmp_path / "p0_copy")
    for twice in (["p0", "p0"], ["p0", "p1", "p0_copy"]):
        res = runner.invoke(app, ["corpus", "merge", *(str(tmp_path / p) for p in twice), "--out", str(tmp_path / "m2")])
        # the CLI's entry point turns the ValueError into one line and exit 2 (tests/cli/test_cli_app.py)
        assert isinstance(res.exception, ValueError) and "give each part once" in str(res.exception)
        assert not (tmp_path / "m2" / "manifest.json").exists()

    # Regression (hostile-user probe): a merge into a finished corpus, or into one of its own parts,
    # wrote its manifest over it and reused the old shards: a corpus whose manifest and shards
    # disagree, and a part destroyed. A merge of some parts of a split build passed silently.
    before = {p: (p / "manifest.json").read_bytes() for p in (tmp_path / "merged", tmp_path / "p0")}
    for parts, out, message in ((["p0", "p1"], "merged", "already holds a finished corpus"),
                                (["p0", "p1"], "p0", "overlaps the part"),
                                (["p0", "p1"], "p0/inner", "overlaps the part"),
                                (["p0"], "m3", r"parts \[1\] of 2 of a split build are missing")):
        res = runner.invoke(app, ["corpus", "merge", *(str(tmp_path / p) for p in parts), "--out", str(tmp_path / out)])
        assert isinstance(res.exception, ValueError) and re.search(message, str(res.exception)), (out, res.exception)
    assert {p: (p / "manifest.json").read_bytes() for p in before} == before
    assert not (tmp_path / "m3").exists() and not (tmp_path / "p0" / "inner").exists()


def test_cli_reports_bad_arguments(tmp_path):
    res = CliRunner().invoke(app, ["corpus", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert isinstance(res.exception, FileNotFoundError) and "source not found" in str(res.exception)

"""Decode workers of the corpus builder: start methods, ending with the build, the census's isolation.

Review findings on ``openmednet.data.corpus._pool`` and ``_census``: a worker started by a fork
server is not a child of the build, so it must watch the build's pid, not its parent's; and the
channel census decodes untrusted files, so it runs in the same isolated workers as the decode
stage. Pool tests run in a child process (so the build can be killed) with a helper module in
``tmp_path`` that the workers import; builds use real images of ../shared/data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openmednet.data.corpus import build_corpus
from openmednet.data.shards import CorpusArrays
from openmednet.data.sources import SourceSpec

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")

# Timeouts are generous: on 2 busy cores a fresh interpreter importing torch takes 20 s or more.

# Each task waits until `n` workers hold one, so the pool's workers are all seen.
_HELPER = """
import os, time
from pathlib import Path
def rendezvous(folder, n):
    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + 600
    while len(os.listdir(folder)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.getpid()
"""

# The "build": a pool that runs and is closed, then a pool left open until the test kills it.
_CHILD = """
import json, multiprocessing as mp, os, sys, time
from pathlib import Path
from helper import rendezvous
from openmednet.data.corpus._pool import worker_pool
method, tmp = sys.argv[1], Path(sys.argv[2])
ctx = mp.get_context(method)
if method == "forkserver":
    ctx.set_forkserver_preload(["openmednet.data.corpus._pool", "helper"])
def workers_of(pool, name):
    (tmp / name).mkdir()
    return [f.result(timeout=900) for f in [pool.submit(rendezvous, str(tmp / name), 2) for _ in range(2)]]
def report(name, pids):
    (tmp / f"{name}.tmp").write_text(json.dumps(pids))
    os.replace(tmp / f"{name}.tmp", tmp / f"{name}.json")
with worker_pool(2, ctx) as pool:
    pids = workers_of(pool, "closed")
report("closed", pids)
pool = worker_pool(2, ctx)
report("killed", workers_of(pool, "killed"))
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    """Whether a process has ended (absent, or a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the build process ended before {what}:\n{proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# spawn was never broken (its workers are the build's children) and starts 4 fresh interpreters
# that import torch (about a minute on 2 busy cores): opt-in with --runslow
@pytest.mark.parametrize("method", ["forkserver", pytest.param("spawn", marks=pytest.mark.slow)])
def test_workers_run_and_end_with_the_pool_or_the_killed_build(method, tmp_path):
    """Under forkserver a worker's parent is the fork server: the old ``os.getppid()`` check made
    every worker exit at start, so the pool broke before running anything."""
    (tmp_path / "helper.py").write_text(_HELPER)
    env = os.environ | {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, method, str(tmp_path)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_for((tmp_path / "closed.json").is_file, proc, "the first pool ran and closed")
        closed = json.loads((tmp_path / "closed.json").read_text())
        assert len(set(closed)) == 2 and os.getpid() not in closed
        deadline = time.monotonic() + 60
        while not all(map(_gone, closed)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(map(_gone, closed)), "workers of a closed pool are still running"

        _wait_for((tmp_path / "killed.json").is_file, proc, "the second pool ran")
        killed = json.loads((tmp_path / "killed.json").read_text())
        assert len(set(killed)) == 2 and not any(map(_gone, killed))
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while not all(map(_gone, killed)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(map(_gone, killed)), f"workers {killed} outlived the killed build ({method})"


_BUILD_CHILD = """
import json, multiprocessing as mp, sys
from pathlib import Path
mp.set_start_method("forkserver")
mp.set_forkserver_preload(["openmednet.data.corpus"])
import numpy as np
from openmednet.data.corpus import build_corpus
from openmednet.data.shards import CorpusArrays
from openmednet.data.sources import SourceSpec
src, tmp = SourceSpec("covid", Path(sys.argv[1]), format="flat"), Path(sys.argv[2])
m = build_corpus([src], tmp / "pool", channels="auto", image_size=32, workers=2, chunk_items=2)
build_corpus([src], tmp / "here", channels="auto", image_size=32, workers=1)
a, b = CorpusArrays(tmp / "pool"), CorpusArrays(tmp / "here")
same = len(a) == len(b) and all(np.array_equal(a.image(i), b.image(i)) for i in range(len(a)))
print(json.dumps({"images": m.num_images, "skipped": m.stats["skipped"], "same": same}))
"""


def test_a_build_with_forkserver_workers_decodes_every_image(shared_data, tmp_path):
    """The start method that Python 3.14 makes the default on Linux."""
    src = tmp_path / "covid"
    src.mkdir()
    for p in sorted((shared_data / "gray/pretrain/covid_cxr_figure1/images").glob("*.jpg"))[:5]:
        shutil.copy(p, src / p.name)
    run = subprocess.run(
        [sys.executable, "-c", _BUILD_CHILD, str(src), str(tmp_path)], capture_output=True, text=True, timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == {"images": 5, "skipped": {}, "same": True}


# --- the channel census decodes in the isolated workers ------------------------------------------


def _covid_folder(shared_data: Path, dst: Path, n: int, rename: dict[int, str] | None = None) -> Path:
    dst.mkdir()
    for i, p in enumerate(sorted((shared_data / "gray/pretrain/covid_cxr_figure1/images").glob("*.jpg"))[:n]):
        shutil.copy(p, dst / (rename or {}).get(i, p.name))
    return dst


def test_a_decoder_crash_in_the_channel_census_costs_one_sample(shared_data, tmp_path, monkeypatch):
    """Finding: the census decoded its sample in the build process, outside the isolated workers;
    a file that kills its decoder would have killed the build."""
    from openmednet.data.corpus import _census, _decode

    src = _covid_folder(shared_data, tmp_path / "files", 5, {2: "crash_me.jpg"})
    build = os.getpid()

    def crashing(original):
        def stand_in(items, *args):
            if any("crash_me" in d["path"] for d in items):
                if os.getpid() == build:
                    raise AssertionError(f"{original.__name__} decoded a file in the build process")
                os._exit(1)  # what a segfaulting C decoder does to its process
            return original(items, *args)

        # the pool pickles the function by name: make the stand-in importable under the original name
        stand_in.__module__, stand_in.__qualname__ = original.__module__, original.__qualname__
        return stand_in

    monkeypatch.setattr(_census, "sample_is_gray", crashing(_census.sample_is_gray))
    monkeypatch.setattr(_decode, "process_chunk", crashing(_decode.process_chunk))
    out = tmp_path / "c"
    manifest = build_corpus(
        [SourceSpec("files", src, format="flat")], out, channels="auto", image_size=32, workers=2, chunk_items=2,
        keep_work_files=True,
    )  # fmt: skip
    census = json.loads((out / ".build/census.json").read_text())
    assert census == {"channels": 1, "sources": {"files": {"items": 5, "test": 0, "gray": 4, "colour": 0}}}
    assert manifest.stats["skipped"] == {"read_error": 1}
    assert sorted(Path(r["path"]).name for r in CorpusArrays(out).iter_records()) == sorted(
        p.name for p in src.iterdir() if p.name != "crash_me.jpg"
    )


def test_hostile_files_in_the_census_sample_are_left_out_and_reported(shared_data, tmp_path):
    """A bomb, a truncated and an empty file inside the census sample: the census counts only the
    readable images, and the decode stage reports each file as a skip."""
    import struct
    import zlib

    from PIL import Image

    src = _covid_folder(shared_data, tmp_path / "files", 3)
    first = sorted(src.iterdir())[0]
    Image.open(first).convert("L").save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    body = b"IHDR" + struct.pack(">II", 100_000, 100_000) + png[24:29]  # claims 10^10 pixels
    ihdr = struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))
    (src / "z_bomb.png").write_bytes(png[:8] + ihdr + png[33:])
    jpg = first.read_bytes()
    (src / "z_truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (src / "z_empty.png").write_bytes(b"")
    out = tmp_path / "c"
    manifest = build_corpus(
        [SourceSpec("files", src, format="flat")], out, channels="auto", image_size=32, workers=2, keep_work_files=True
    )
    census = json.loads((out / ".build/census.json").read_text())
    assert census["sources"]["files"] == {"items": 6, "test": 0, "gray": 3, "colour": 0}
    assert manifest.num_images == 3
    assert manifest.stats["skipped"] == {"decompression_bomb": 1, "corrupt": 1, "empty_file": 1}

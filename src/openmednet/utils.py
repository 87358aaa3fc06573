"""Small shared utilities: atomic file writes, CSV tables, hashing, seeding."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so readers see the old file or the complete new one, never a partial one.

    ``write`` receives a binary file object in the same directory; it is fsynced and renamed over
    ``path`` (``os.replace`` is atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> tuple[str, int]:
    """A table as CSV text and its number of rows: the one CSV format of every table the package
    writes (predictions.csv of fine-tuning and of ``predict``, splits.csv, per_image.csv).

    The csv module's default dialect (RFC 4180): rows end in CRLF, and a field holding a comma,
    quote, CR or LF is quoted. ``rows`` is consumed once, row by row (a generator's images can be
    freed as it goes). A lone LF row ending would leave a CR inside a field unquoted: a file named
    ``"scan\rpatient42.png"`` then read back as a row for ``patient42.png``.
    """
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
    return buf.getvalue(), count


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

"""Exact and near duplicate detection that scales to millions of images.

Two kinds of identity are used by the corpus builder (``openmednet.data.corpus``):

- **Exact**: SHA-1 of the file bytes (with the frame index, for multi-frame files) and SHA-1 of the
  decoded pixels *after* normalisation (so the same picture re-encoded losslessly, or saved as RGB
  with gray content, still matches). Both are kept as full hex strings in the shard records and as
  their first 8 bytes (``uint64``) in in-memory tables: at 3M images the chance of a collision of
  64-bit prefixes is about 3e6**2 / 2**65 = 2.4e-7.
- **Near**: a 64-bit perceptual hash (DCT hash, ``imagehash.phash``) of the decoded image *before*
  resizing, compared by Hamming distance. phash squeezes the whole frame to 32x32, so it is blind
  to aspect-ratio changes and re-encoding: on ../shared/data the 456 ISIC images shared by
  isic_archive (aspect kept, 128 px JPEG) and isic2017_melanoma (squashed to 256x256) are 0-2 bits
  apart, while unrelated dermoscopy images are 14 or more bits apart. It does not match crops:
  bccd_wbc cell crops are not found in the bccd_smears smears they were cut from.

Both perceptual hashes are computed by ``openmednet.data.phash.phashes`` (one ``L`` conversion,
exact Pillow Lanczos thumbnails as batched matrix products, batched DCT): the same bits as
``imagehash.phash`` at about a third of its cost, so shipped fingerprints, built corpora and the
thresholds below stay valid. ``phashes`` hashes many images at once and is what callers with
more than one image use; ``phash64`` / ``phash256`` are its one-image forms.

Near search uses **multi-index hashing** (Norouzi et al., "Fast search in Hamming space with
multi-index hashing", CVPR 2012): the 64 bits are cut into 4 blocks of 16 bits; two hashes within
``t`` bits agree within ``t // 4`` bits on at least one block (pigeonhole), so each block is a
sorted array searched for every value within ``t // 4`` flips. The result is exact (no pair
within ``t`` is missed), fully vectorised with NumPy, and costs about ``n * 4 * C(16, <=t//4)``
binary searches instead of ``n**2 / 2`` comparisons. Identical hashes are collapsed first, so
large clusters of blank or identical images cost nothing extra.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator

import numpy as np

from openmednet.data.phash import phashes

#: Default near-duplicate threshold in bits of the 64-bit phash (see the module docstring for the
#: distances measured on real data: copies 0-2 bits, unrelated images >= 14 bits).
DEFAULT_NEAR_THRESHOLD = 6
#: Default confirmation threshold in bits of the 256-bit phash (16x16 DCT). Measured on
#: ../shared/data: brain_tumor_mri vs brain_mri_yes_no copies found by the 64-bit hash are 10-44
#: bits apart (95% <= 34); knee_oa pairs of *different* knees that the 64-bit hash confuses (all
#: knee radiographs look alike at 8x8) are 40-110 bits apart (95% >= 56).
DEFAULT_CONFIRM_THRESHOLD = 36

_BLOCKS = 4
_BLOCK_BITS = 16
# Bound on candidate pairs materialised at once (each costs ~24 bytes in the intermediate arrays).
_MAX_CANDIDATES = 4_000_000


def phash64(image: np.ndarray) -> int:
    """64-bit perceptual hash of a decoded image (``imagehash.phash``, via ``phashes``).

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` uint8; colour images are hashed on their luminance
            (Pillow's ``L`` conversion), as ``imagehash`` does.

    Returns:
        The hash as a Python int in ``[0, 2**64)``; bit order follows ``imagehash`` (row-major,
        most significant bit first), so ``int(str(imagehash.phash(im)), 16)`` gives the same value.
        To hash many images, ``phashes`` is faster (and gives the 256-bit hashes too).
    """
    return int(phashes([image])[0][0])


def phash256(image: np.ndarray) -> np.ndarray:
    """256-bit perceptual hash (``imagehash.phash`` with ``hash_size=16``) as ``(4,)`` uint64.

    Used to confirm near-duplicate candidates of the 64-bit hash: it keeps 16x16 DCT
    coefficients instead of 8x8, enough to tell apart images of one standardised view (knee
    radiographs) that share their coarse structure.
    """
    return phashes([image])[1][0]


def confirm_pairs(
    pairs: np.ndarray,
    fine: np.ndarray,
    threshold: int = DEFAULT_CONFIRM_THRESHOLD,
    fine_others: np.ndarray | None = None,
) -> np.ndarray:
    """Keep the candidate pairs whose 256-bit hashes are within ``threshold`` bits.

    Args:
        pairs: ``(P, 2)`` indices from ``near_pairs``.
        fine: ``(N, 4)`` uint64 ``phash256`` of the first side.
        threshold: maximum Hamming distance of 256.
        fine_others: ``(M, 4)`` of the second side for a cross join (default ``fine``).
    """
    if len(pairs) == 0:
        return pairs
    other = fine if fine_others is None else fine_others
    d = hamming(fine[pairs[:, 0]], other[pairs[:, 1]]).sum(axis=1)
    return pairs[d <= threshold]


def sha1_pixels(image: np.ndarray) -> str:
    """Hex SHA-1 of an array's shape, dtype and bytes (shape included: a 32x8 and an 8x32 image of
    the same bytes are different pictures)."""
    h = hashlib.sha1(f"{image.shape}{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def sha1_file(path, frame: int = 0, chunk: int = 1 << 20) -> str:
    """Hex SHA-1 of a file's bytes, salted with the frame index for frames after the first.

    Frames of one multi-frame file share the file bytes but are different images; frame 0 keeps
    the plain file SHA-1 so it can be compared with other tools (``sha1sum``).
    """
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    if frame:
        h.update(f"#frame={frame}".encode())
    return h.hexdigest()


def hex_to_u64(hexdigest: str) -> int:
    """First 8 bytes of a hex digest as an unsigned int (the in-memory key of exact matching)."""
    return int(hexdigest[:16], 16)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bitwise Hamming distance of uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def _flip_masks(radius: int) -> np.ndarray:
    """All 16-bit masks with at most ``radius`` bits set, ``(M,)`` uint64."""
    masks = [0]
    for k in range(1, radius + 1):
        for bits in itertools.combinations(range(_BLOCK_BITS), k):
            masks.append(sum(1 << b for b in bits))
    return np.array(masks, dtype=np.uint64)


def _block(hashes: np.ndarray, index: int) -> np.ndarray:
    return (hashes >> np.uint64(_BLOCK_BITS * index)) & np.uint64((1 << _BLOCK_BITS) - 1)


def _candidate_chunks(query_block: np.ndarray, sorted_block: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs ``(query index, sorted position)`` whose block values are equal, in bounded chunks."""
    lo = np.searchsorted(sorted_block, query_block, side="left")
    hi = np.searchsorted(sorted_block, query_block, side="right")
    counts = hi - lo
    cum = np.cumsum(counts)
    start = 0
    while start < len(query_block):
        # take queries until the candidate budget is used (at least one query per chunk)
        base = cum[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, base + _MAX_CANDIDATES, side="right")))
        stop = min(stop, len(query_block))
        c = counts[start:stop]
        q = np.repeat(np.arange(start, stop), c)
        offsets = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        yield q, np.repeat(lo[start:stop], c) + offsets
        start = stop


def near_pairs(
    hashes: np.ndarray,
    threshold: int = DEFAULT_NEAR_THRESHOLD,
    others: np.ndarray | None = None,
) -> np.ndarray:
    """All pairs of hashes within ``threshold`` bits (multi-index hashing, exact).

    Args:
        hashes: ``(N,)`` uint64 perceptual hashes.
        threshold: maximum Hamming distance (0-63).
        others: optional ``(M,)`` uint64; when given, pairs are ``(i in hashes, j in others)``
            (a cross join, e.g. corpus vs excluded targets) instead of pairs inside ``hashes``.

    Returns:
        ``(P, 2)`` int64 index pairs, sorted and unique; for a self join ``i < j``. Equal hashes
        are pairs too (distance 0).
    """
    if not 0 <= threshold < 64:
        raise ValueError(f"near-duplicate threshold must be in [0, 63] bits, got {threshold}")
    hashes = np.asarray(hashes, dtype=np.uint64)
    self_join = others is None
    others = hashes if self_join else np.asarray(others, dtype=np.uint64)
    if len(hashes) == 0 or len(others) == 0:
        return np.zeros((0, 2), np.int64)
    # Collapse identical hashes: search between distinct values, expand to items at the end.
    uq, q_inv = np.unique(hashes, return_inverse=True)
    uo, o_inv = (uq, q_inv) if self_join else np.unique(others, return_inverse=True)
    masks = _flip_masks(threshold // _BLOCKS)
    found = []
    for b in range(_BLOCKS):
        ob = _block(uo, b)
        order = np.argsort(ob, kind="stable")
        sorted_block = ob[order]
        qb = _block(uq, b)
        for mask in masks:
            for qi, pos in _candidate_chunks(qb ^ mask, sorted_block):
                oi = order[pos]
                keep = hamming(uq[qi], uo[oi]) <= threshold
                if self_join:
                    keep &= qi < oi
                found.append(np.stack([qi[keep], oi[keep]], axis=1))
    upairs = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)
    return _expand_pairs(upairs, q_inv.reshape(-1), o_inv.reshape(-1), self_join)


def _members(inverse: np.ndarray) -> list[np.ndarray]:
    """For each distinct value index, the item indices holding it."""
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(inverse.max() + 2))
    return [order[bounds[k] : bounds[k + 1]] for k in range(len(bounds) - 1)]


def _expand_pairs(upairs: np.ndarray, q_inv: np.ndarray, o_inv: np.ndarray, self_join: bool) -> np.ndarray:
    """Distinct-value pairs -> item pairs (plus, for a self join, pairs of items with equal hashes)."""
    q_members = _members(q_inv)
    o_members = q_members if self_join else _members(o_inv)
    q_count = np.array([len(m) for m in q_members])
    o_count = q_count if self_join else np.array([len(m) for m in o_members])
    q_first = np.array([m[0] for m in q_members])
    o_first = q_first if self_join else np.array([m[0] for m in o_members])
    # The common case (both values held by one item) is mapped in one vectorised step.
    single = (q_count[upairs[:, 0]] == 1) & (o_count[upairs[:, 1]] == 1)
    out = [np.stack([q_first[upairs[single, 0]], o_first[upairs[single, 1]]], axis=1)]
    for a, b in upairs[~single]:
        out.append(np.array(np.meshgrid(q_members[a], o_members[b], indexing="ij")).reshape(2, -1).T)
    if self_join:
        for m in q_members:
            if len(m) > 1:
                i, j = np.triu_indices(len(m), k=1)
                out.append(np.stack([m[i], m[j]], axis=1))
    pairs = np.concatenate(out).astype(np.int64)
    if self_join:
        pairs = np.sort(pairs, axis=1)
    return np.unique(pairs, axis=0)


def equal_pairs(keys: np.ndarray) -> np.ndarray:
    """Pairs linking items with equal keys (a chain per key value, enough for connected components).

    Args:
        keys: ``(N,)`` integer keys (e.g. uint64 SHA-1 prefixes); 0 means "no key" and never links.

    Returns:
        ``(P, 2)`` int64 pairs ``(i, j)``, ``i < j``, consecutive members of each equal-key group.
    """
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    same = (k[1:] == k[:-1]) & (k[1:] != 0)
    pairs = np.stack([order[:-1][same], order[1:][same]], axis=1).astype(np.int64)
    return np.sort(pairs, axis=1)


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component id of each of ``n`` items under the undirected edges ``pairs``.

    Returns:
        ``(n,)`` int64 labels; ids are the smallest member index of each component, so they are
        stable under any re-ordering of ``pairs``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # relabel: component id = its smallest member
    first = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    return first[labels]

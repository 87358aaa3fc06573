"""Both perceptual hashes of many images at once, bit-identical to ``imagehash.phash``.

The corpus builder, the exclusion targets, the fine-tuning targets (leakage checks), the
unlabelled pools and the segmentation sets all hash every image twice: ``imagehash.phash`` with
``hash_size=8`` (64 bits, near-duplicate search) and ``hash_size=16`` (256 bits, confirmation),
see ``openmednet.data.dedupe``. ``imagehash`` converts to ``L``, shrinks with Pillow's Lanczos
filter to 32x32 (resp. 64x64), takes a 2-D DCT-II (``scipy.fftpack.dct`` along axis 0 then 1),
and sets a bit where a low-frequency coefficient exceeds their median. Measured on the 128 px
pretraining pools of ../shared/data (docs/benchmarks.md, "Corpus hashing"), the two calls cost
about as much as decoding the image, most of it in Pillow's two scalar resizes.

This module computes the same bits faster, and is the one implementation every caller uses:

- **One ``L`` conversion** shared by both sizes: Pillow's luma (``Convert.c``,
  ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``) as one exact float32 product, 3x faster than
  ``Image.fromarray(...).convert("L")``; checked once per process against the installed Pillow,
  which is used instead if it differs.
- **The resize as matrix products.** Pillow's 8-bit resample (``libImaging/Resample.c``) is
  separable: per axis, fixed-point coefficients with 22 fractional bits (``precompute_coeffs``,
  ``normalize_coeffs_8bpc``), output ``clip8((2**21 + sum(p * k)) >> 22)``, the first pass
  rounded to uint8 before the second. The coefficient matrices are rebuilt here with Pillow's
  double-precision formulas and applied to a batch of same-shape images as float32 BLAS
  products: one per pass, or for a large batch one per band of 16 output columns over only the
  input pixels that band reads (``_bands``: a Lanczos column is zero outside ``2 * 3 * scale``
  pixels, so a dense product spends most of its multiplications on zeros). float32 is not exact
  for these sums, so every output whose float32 value lies within a rigorous error bound of a
  rounding boundary (about 0.2% of them) is recomputed exactly in float64 from integers (all
  partial sums < 2**53). The result is Pillow's, bit for bit.
- **Pass order and coefficients are checked against the installed Pillow, not assumed.**
  Pillow 13 runs the vertical pass first when the height shrinks much more than the width
  (python-pillow/Pillow#9549; it changed hashes of tall images, e.g. bigcat88/pillow_heif#489),
  and the two orders round differently. For every (input shape, output size) a seeded noise
  image is resized by Pillow and by both orders here; the order that reproduces Pillow is used
  (cached), and when neither does (a future Pillow change) that shape falls back to Pillow's own
  resize, so the hash stays ``imagehash``'s whatever the Pillow version.
- **Small blocks, shared first passes.** Same-shape images are resized in blocks of at most
  ``_BATCH_PIXELS`` (16 images of 128 px), so every array stays near 1 MB: with the builder's
  whole chunk of 64 at once, the freed 2-4 MB arrays went back to the kernel after every chunk
  and were faulted in again (a third of the hashing CPU time). Blocks whose shapes differ only
  along the second pass's axis (most rare shapes of a pool: 128 px wide, of many heights) go
  through one first pass together (``_resize_stacks``; that pass's coefficients depend only on
  its own axis), so a rare shape no longer pays a whole set of products and their fixed costs.
- **Batched DCT and median**: ``scipy.fftpack.dct`` and ``numpy.median`` over a stack of
  thumbnails give per-image results identical to the per-image calls (pocketfft applies the
  same 1-D transform to every line; the median of an even count is the mean of the two middle
  values either way); the second DCT runs only on the rows the hash keeps.
  ``tests/data/test_phash.py`` checks the whole hash against ``imagehash.phash`` on real gray,
  colour, RGB-saved gray, upsampled 28 px and tall images of ../shared/data.
- **One BLAS thread** while hashing (``threadpoolctl``): the products are a few MFLOP, and a
  multi-threaded BLAS in each decode worker, next to a training job, thrashes (measured about
  100x slower on 2 loaded cores).

A shape takes this path once ``_PROBE_AFTER`` images of it were hashed in the process (its
coefficient tables and probe cost some 20 Pillow resizes; pools repeat a few shapes thousands of
times, originals of targets may all differ); before, and for images larger than
``MAX_MATMUL_PIXELS`` (the dense products grow with the area times 96 output columns), Pillow
resizes it, with the rest of the batch path unchanged.
Measured cost (docs/benchmarks.md, "Corpus hashing", final run at ``d50a9f5``): hashing takes
0.37x (gray) and 0.34x (colour) the decode time of the 128 px pools, against 1.19x and 1.15x for
the two ``imagehash.phash`` calls, on a loaded 2-core AVX2 machine.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import scipy.fftpack
from PIL import Image

__all__ = ["MAX_MATMUL_PIXELS", "phashes"]

#: Fixed-point fraction bits of Pillow's 8-bit resample (``PRECISION_BITS = 32 - 8 - 2``).
_BITS = 22
#: Pillow's Lanczos support (``LANCZOS = {lanczos_filter, 3.0}``).
_SUPPORT = 3.0
#: ``imagehash.phash``'s ``highfreq_factor``: the thumbnail is 4x the hash side.
_HIGHFREQ = 4
#: Hash sides: 8 -> 64 bits, 16 -> 256 bits.
SIZES = (8, 16)
_SIDES = tuple(s * _HIGHFREQ for s in SIZES)
#: Largest image (pixels) resized by matrix products; bigger ones use Pillow's resize.
MAX_MATMUL_PIXELS = 1024 * 1024
#: Pixels of one block of same-shape images, converted to ``L`` and resized together: 16 images of
#: 128 px, so that every array of the two passes stays near 1 MB. Larger blocks cost more than they
#: save: with 64 images of 128 px (4 MB float32 stacks, the builder's whole chunk) glibc returned
#: the freed arrays to the kernel after every chunk, and each new one was faulted in afresh (about
#: 32 page faults per image, a third of the hashing CPU time; measured on 3,000 images of each
#: pretraining family of ../shared/data, fresh process, one thread). Also bounds memory when
#: callers pass many images.
_BATCH_PIXELS = 1 << 18
#: Thumbnails transformed at once by ``_bits`` (bounds its float64 DCT arrays to a few MB).
_DCT_CHUNK = 256
#: A shape gets the fast path once this many images of it were hashed in this process; before,
#: Pillow resizes it (exactly ``imagehash``). A new shape costs coefficient tables and a probe,
#: a few ms for a 100-300 px shape (about 20 Pillow resizes; loaded machine): on brain_mri_yes_no
#: (253 originals, 184 shapes) probing every shape made hashing 3.5x slower than ``imagehash``,
#: with this gate it is as fast. The pools' shapes recur hundreds of times.
_PROBE_AFTER = 8
_seen_shapes: Counter[tuple[int, int]] = Counter()


def _sinc(t: np.ndarray) -> np.ndarray:
    """Pillow's ``sinc_filter`` elementwise: ``sin(t * pi) / (t * pi)``, 1 at 0, with the C
    library's ``sin`` (``math.sin``; NumPy's own ``sin`` may round differently)."""
    tp = t * math.pi
    sin = np.array([math.sin(v) for v in tp.ravel().tolist()]).reshape(tp.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(t == 0.0, 1.0, sin / tp)


@lru_cache(maxsize=512)
def _coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Pillow's fixed-point Lanczos coefficients as an ``(in_size, out_size)`` matrix.

    Follows ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` of ``libImaging/Resample.c``
    (Python floats are the C doubles, ``math.sin`` the same libm). An axis that keeps its size
    is not resampled by Pillow; the identity matrix (``1 << 22`` on the diagonal) gives that.

    Returns:
        ``(k_f64_t, k_f32, l1, taps)``: the transposed ``(out_size, in_size)`` integer
        coefficients as float64, the coefficients divided by ``2**22`` as float32 (exact: at
        most 23 significant bits), and for the float32 error bound the largest column sum of
        ``|k| / 2**22`` and the most non-zero coefficients of a column.
    """
    k = np.zeros((in_size, out_size), np.int64)
    if in_size == out_size:
        np.fill_diagonal(k, 1 << _BITS)
    else:
        scale = in_size / out_size  # (double)(in1 - in0) / outSize with in0 = 0, in1 = in_size
        filterscale = max(scale, 1.0)
        support = _SUPPORT * filterscale
        ss = 1.0 / filterscale
        center = (np.arange(out_size) + 0.5) * scale
        # (int) casts truncate toward zero; negative starts clamp to 0 either way
        xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
        xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
        x = np.arange(int(xmax.max()))
        inside = x[None, :] < xmax[:, None]
        arg = ((x[None, :] + xmin[:, None]) - center[:, None] + 0.5) * ss
        w = np.where(inside & (arg >= -3.0) & (arg < 3.0), _sinc(arg) * _sinc(arg / 3), 0.0)
        ww = np.cumsum(w, axis=1)[:, -1:]  # sequential, as the C loop (trailing zeros add nothing)
        w = np.divide(w, ww, out=w.copy(), where=ww != 0.0)
        scaled = w * (1 << _BITS)
        fixed = np.trunc(np.where(w < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)  # half away from 0
        rows, cols = np.nonzero(inside)
        k[(x[cols] + xmin[rows]), rows] = fixed[rows, cols]
    l1 = float(np.abs(k).sum(axis=0).max()) / (1 << _BITS)
    taps = int((k != 0).sum(axis=0).max())
    return np.ascontiguousarray(k.T, dtype=np.float64), (k / (1 << _BITS)).astype(np.float32), l1, taps


#: Output columns of one banded product (``_bands``): narrower products run far below the BLAS
#: peak, wider ones read more input pixels that are zero for most of their columns.
_BAND_COLUMNS = 16
#: Smallest pass (rows x input pixels, about 8 images of 128 px) computed in bands: below it one
#: dense product is faster, the products being too small for their zeros to matter.
_MIN_BANDED = 1024 * 128


@lru_cache(maxsize=512)
def _bands(in_size: int, out_sizes: tuple[int, ...]) -> tuple[tuple[int, int, int, int, np.ndarray], ...]:
    """The coefficients of ``_kernels`` cut into bands of ``_BAND_COLUMNS`` output columns, each
    with only the input pixels its columns read: ``(c0, c1, lo, hi, k)`` with ``k`` the float32
    coefficients of columns ``c0:c1`` and input pixels ``lo:hi``.

    A Lanczos output column has non-zero coefficients on only ``2 * 3 * scale`` input pixels (about
    25 of 128 for 128 -> 32 px), so one dense product spends most of its multiplications on exact
    zeros; the bands skip most of them (they multiply 0.40 of the dense product's terms for the
    first pass of a 128 px image, 0.58 and 0.31 for the second passes to 32 and 64 px). The
    skipped terms are zeros, so every sum keeps its non-zero terms and ``_pass``'s error bound
    holds unchanged.
    """
    k64t, k32 = _kernels(in_size, out_sizes)[:2]
    nz = k64t != 0
    first = np.argmax(nz, axis=1)
    last = in_size - 1 - np.argmax(nz[:, ::-1], axis=1)
    bands, c0 = [], 0
    for size in out_sizes:  # a band never mixes two output sizes: their supports differ
        for c in range(c0, c0 + size, _BAND_COLUMNS):
            c1 = min(c + _BAND_COLUMNS, c0 + size)
            lo, hi = int(first[c:c1].min()), int(last[c:c1].max()) + 1
            bands.append((c, c1, lo, hi, np.ascontiguousarray(k32[lo:hi, c:c1])))
        c0 += size
    return tuple(bands)


def _product(x: np.ndarray, in_size: int, out_sizes: tuple[int, ...]) -> np.ndarray:
    """``x @ k32`` of ``_kernels``: one dense product for a small ``x``, else one product per band
    (``_bands``), each written straight into its columns of the result."""
    k32 = _kernels(in_size, out_sizes)[1]
    if x.size < _MIN_BANDED:
        return x @ k32
    t = np.empty((len(x), k32.shape[1]), np.float32)
    for c0, c1, lo, hi, k in _bands(in_size, out_sizes):
        np.matmul(x[:, lo:hi], k, out=t[:, c0:c1])
    return t


@lru_cache(maxsize=512)
def _kernels(in_size: int, out_sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, float, int, np.ndarray, int]:
    """``_coeffs`` of several output sizes side by side (one product serves both hash sizes),
    and the band of each output column: ``band[c] + arange(width)`` covers its non-zero
    coefficients inside ``[0, in_size)`` (the exact recomputation reads only those). The width
    is the longest span from first to last non-zero coefficient, which can exceed the count of
    non-zero ones: Lanczos zeros at integer arguments round to exact zeros."""
    parts = [_coeffs(in_size, s) for s in out_sizes]
    k64t = np.concatenate([p[0] for p in parts])
    nz = k64t != 0
    first = np.argmax(nz, axis=1)
    last = in_size - 1 - np.argmax(nz[:, ::-1], axis=1)
    width = int((last - first).max()) + 1
    band = np.minimum(first, in_size - width)
    return k64t, np.concatenate([p[1] for p in parts], axis=1), max(p[2] for p in parts), max(p[3] for p in parts), band, width


def _pass(x: np.ndarray, in_size: int, out_sizes: tuple[int, ...]) -> np.ndarray:
    """One Pillow 8-bit resample pass along the last axis, exactly, to each of ``out_sizes``.

    Args:
        x: ``(rows, in_size)`` float32 holding integers 0-255.

    Returns:
        ``(rows, sum(out_sizes))`` float32 holding Pillow's uint8 results, one block of columns
        per output size.
    """
    k64t, _, l1, taps, band, width = _kernels(in_size, out_sizes)
    # Error of a float32 dot product in any summation order (blocked BLAS, FMA or not):
    # |fl(sum) - sum| <= gamma_m * sum|p k|, gamma_m = m u / (1 - m u), u = 2**-24, where m counts
    # the non-zero products (adding an exact zero rounds nothing) and sum|p k| <= 255 * l1; the
    # additions below round once more at a magnitude <= 255 * l1 + 1. Factor 2 of margin.
    u = 2.0**-24
    bound = np.float32(2 * (taps + 1) * u / (1 - (taps + 1) * u) * (255.0 * l1 + 1.0))
    t = _product(x, in_size, out_sizes)
    # Pillow: floor(v + 0.5). Shifting by the bound too, floor(v + 0.5 + bound) is Pillow's value
    # wherever the fraction of v + 0.5 + bound is at least 2 * bound; the others (the float32 sum
    # may sit on the wrong side of a boundary) are recomputed exactly.
    t += np.float32(0.5) + bound
    out = np.floor(t)
    t -= out  # the fraction, exact (Sterbenz)
    flat = np.flatnonzero(t < 2 * bound)
    if len(flat):
        r, c = np.divmod(flat, t.shape[1])
        cols = band[c][:, None] + np.arange(width)
        s = np.einsum("ij,ij->i", x[r[:, None], cols].astype(np.float64), k64t[c[:, None], cols])  # exact: < 2**53
        out[r, c] = np.floor((s + (1 << (_BITS - 1))) * 2.0**-_BITS)
    np.clip(out, 0, 255, out=out)
    return out


def _resize_stack(stack: np.ndarray, sides: tuple[int, ...], order: str) -> list[np.ndarray]:
    """Exact Pillow Lanczos thumbnails of ``(n, H, W)`` images, one ``(n, side, side)`` float32
    stack per side, passes in ``order`` (``"hv"``: along the width first, Pillow's usual
    order; ``"vh"``: along the height first). Both sides share each product."""
    return _resize_stacks([list(stack)], sides, order)[0]


def _resize_stacks(blocks: Sequence[Sequence[np.ndarray]], sides: tuple[int, ...], order: str) -> list[list[np.ndarray]]:
    """``_resize_stack`` of several blocks of same-shape ``L`` images, the shapes differing only
    along the second pass's axis (for ``"hv"`` all of one width, for ``"vh"`` of one height):
    the rows of all of them go through one first pass together.

    The first pass's coefficients depend only on the length of its axis, and each row is
    resampled on its own, so the shared product gives every row the pixels it would get alone.
    A pool's rare shapes (gray pools: about 20% of the images, 1-6 of a shape per chunk of 64,
    all 128 px wide) thus share one product and its fixed per-call costs instead of paying them
    once per shape; only the second pass, whose coefficients depend on the other axis, runs per
    shape. The rows are gathered straight into one float32 array (no per-block stack copies).
    """
    if order == "vh":
        blocks = [[image.T for image in block] for block in blocks]
    length = blocks[0][0].shape[1]
    mid = _pass(np.concatenate([image for block in blocks for image in block], dtype=np.float32), length, sides)
    out, start = [], 0
    for block in blocks:
        n, h = len(block), block[0].shape[0]
        out.append(_second_passes(mid[start : start + n * h].reshape(n, h, -1), sides, order))
        start += n * h
    return out


def _second_passes(mid: np.ndarray, sides: tuple[int, ...], order: str) -> list[np.ndarray]:
    """The second pass of ``_resize_stack`` from the first pass's ``(n, h, sum(sides))`` result:
    one ``(n, side, side)`` float32 stack per side, indexed ``(y, x)``."""
    n, h, _ = mid.shape
    outs, col = [], 0
    for side in sides:
        part = np.ascontiguousarray(mid[:, :, col : col + side].transpose(0, 2, 1)).reshape(n * side, h)
        res = _pass(part, h, (side,)).reshape(n, side, side)
        # after "hv" the result is indexed (x, y): transpose back; after "vh" it is (y, x)
        outs.append(res.transpose(0, 2, 1) if order == "hv" else res)
        col += side
    return outs


def _pillow(gray: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.LANCZOS))


@lru_cache(maxsize=4096)
def _order(h: int, w: int, size: int) -> str:
    """How to reproduce the installed Pillow's ``resize((size, size), LANCZOS)`` of an ``h x w``
    ``L`` image: ``"hv"``/``"vh"`` (the pass order that gives Pillow's pixels on a seeded noise
    image) or ``"pillow"`` (neither does, or the image is too large: call Pillow)."""
    if h * w > MAX_MATMUL_PIXELS:
        return "pillow"
    probe = np.random.default_rng([h, w, size]).integers(0, 256, (h, w), dtype=np.uint8)
    ref = _pillow(probe, size)
    for order in ("hv", "vh"):
        if np.array_equal(_resize_stack(probe[None], (size,), order)[0][0], ref):
            return order
    return "pillow"


@lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController  # a dependency (pyproject.toml)
    except ImportError:  # pragma: no cover - declared in pyproject.toml
        return None
    return ThreadpoolController()


def _one_blas_thread():
    """BLAS limited to one thread while hashing: the products are small (a few MFLOP), and a
    multi-threaded BLAS in each of several decode workers, or next to a training job,
    oversubscribes the cores (measured: 29 ms instead of 0.27 ms for the thumbnails of one
    128 px image, on 2 loaded cores)."""
    controller = _blas_controller()
    return controller.limit(limits=1, user_api="blas") if controller is not None else contextlib.nullcontext()


#: Pillow's ``RGB`` -> ``L`` weights (``Convert.c``: ``L24(rgb) >> 16``, ITU-R 601-2 luma in 16-bit
#: fixed point, + 0x8000 to round).
_LUMA = np.array([19595, 38470, 7471], np.float32)


@lru_cache(maxsize=1)
def _luma_matches_pillow() -> bool:
    """Whether ``_to_gray``'s luma reproduces the installed Pillow's ``convert("L")`` (checked once
    per process on seeded noise; older Pillow releases used other weights)."""
    probe = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return np.array_equal(_luma(probe), np.asarray(Image.fromarray(probe).convert("L")))


def _luma(rgb: np.ndarray) -> np.ndarray:
    # float32 is exact here: every partial sum is below 255 * 65536 < 2**24
    y = rgb.reshape(-1, 3).astype(np.float32) @ _LUMA
    return ((y.astype(np.uint32) + 0x8000) >> 16).astype(np.uint8).reshape(rgb.shape[:2])


def _to_gray(image: np.ndarray) -> np.ndarray:
    """The ``L`` image ``imagehash`` hashes: Pillow's ``convert("L")`` of ``Image.fromarray``."""
    if image.dtype == np.uint8:
        if image.ndim == 2:
            return image
        if image.ndim == 3 and image.shape[2] == 3 and _luma_matches_pillow():
            return _luma(image)  # 3x faster than Image.fromarray(...).convert("L"), same pixels
    return np.asarray(Image.fromarray(image).convert("L"))


def _bits(thumbs: np.ndarray, hash_size: int) -> np.ndarray:
    """``imagehash.phash``'s bits of a stack of thumbnails: ``(n, hash_size**2 // 8)`` uint8."""
    out = np.empty((len(thumbs), hash_size * hash_size // 8), np.uint8)
    # In chunks: the DCT works in float64, 64 KB per 64 px thumbnail and again for its result,
    # which for a whole target set (thousands of images) would be hundreds of MB at once.
    for start in range(0, len(thumbs), _DCT_CHUNK):
        # imagehash: dct(dct(pixels, axis=0), axis=1)[:hash_size, :hash_size]. Each 1-D transform
        # is independent of the others, so the second one runs on the kept rows only.
        rows = scipy.fftpack.dct(thumbs[start : start + _DCT_CHUNK], axis=1)[:, :hash_size, :]
        d = scipy.fftpack.dct(rows, axis=2)[:, :, :hash_size]
        low = d.reshape(len(d), -1)
        out[start : start + len(low)] = np.packbits(low > np.median(low, axis=1, keepdims=True), axis=1)
    return out


def _packed(blocks: list[tuple[list[int], int]]) -> list[list[list[int]]]:
    """Blocks of image indices ``(indices, pixels)``, in order, gathered into batches of at most
    ``_BATCH_PIXELS`` pixels (a larger block alone), each resized by one ``_resize_stacks``."""
    batches: list[list[list[int]]] = []
    total = 0
    for part, pixels in blocks:
        if not batches or total + pixels > _BATCH_PIXELS:
            batches.append([])
            total = 0
        batches[-1].append(part)
        total += pixels
    return batches


def phashes(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """64- and 256-bit perceptual hashes of many images (``imagehash.phash``, bit for bit).

    Args:
        images: ``(H, W)`` or ``(H, W, 3)`` uint8 arrays, any mix of shapes; colour images are
            hashed on their luminance (Pillow's ``L``), as ``imagehash`` does.

    Returns:
        ``(phash64, phash256)``: ``(N,)`` uint64 (``int(str(imagehash.phash(im)), 16)``) and
        ``(N, 4)`` uint64 (``hash_size=16``, most significant word first), as
        ``dedupe.phash64`` / ``dedupe.phash256`` return them.
    """
    n = len(images)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros((0, 4), np.uint64)
    thumbs = {side: np.zeros((n, side, side), np.uint8) for side in _SIDES}
    # Grouped by the shape of the L image (that of the array's first two axes), in blocks of at
    # most _BATCH_PIXELS; each block is converted to L when it is resized, so at most one batch's
    # L copies exist at a time.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, a in enumerate(images):
        groups.setdefault(np.shape(a)[:2], []).append(i)
    # Fast-path blocks by what their first pass can share (_resize_stacks): pass order, length of
    # the first pass's axis, sides; each block with its pixel count.
    shared: dict[tuple[str, int, tuple[int, ...]], list[tuple[list[int], int]]] = {}
    with _one_blas_thread():
        for (h, w), members in groups.items():
            _seen_shapes[(h, w)] += len(members)
            if _seen_shapes[(h, w)] < _PROBE_AFTER:  # not worth a probe (yet): Pillow, exactly
                orders = dict.fromkeys(_SIDES, "pillow")
            else:
                orders = {side: _order(h, w, side) for side in _SIDES}
            pillow_sides = [side for side, order in orders.items() if order == "pillow"]
            step = max(1, _BATCH_PIXELS // (h * w))  # bounds the L and float32 copies
            for start in range(0, len(members), step):
                part = members[start : start + step]
                if pillow_sides:
                    grays = [_to_gray(np.asarray(images[i])) for i in part]
                    for side in pillow_sides:
                        for i, g in zip(part, grays):
                            thumbs[side][i] = _pillow(g, side)
                for order in sorted(set(orders.values()) - {"pillow"}):
                    sides = tuple(side for side, o in orders.items() if o == order)
                    key = (order, w if order == "hv" else h, sides)
                    shared.setdefault(key, []).append((part, len(part) * h * w))
        for (order, _, sides), blocks in shared.items():
            for batch in _packed(blocks):
                grays = [[_to_gray(np.asarray(images[i])) for i in part] for part in batch]
                for part, results in zip(batch, _resize_stacks(grays, sides, order)):
                    for side, res in zip(sides, results):
                        thumbs[side][part] = res
    h64 = np.frombuffer(_bits(thumbs[8 * _HIGHFREQ], 8).tobytes(), dtype=">u8").astype(np.uint64)
    h256 = np.frombuffer(_bits(thumbs[16 * _HIGHFREQ], 16).tobytes(), dtype=">u8").astype(np.uint64).reshape(n, 4)
    return h64, h256

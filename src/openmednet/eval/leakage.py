"""Pre-training leakage: were a target's test images (or near-copies) in an init's pre-training corpus?

The corpus is a directory built by ``openmednet corpus build`` or, for users who only have the
weights, the fingerprint that ships with them (``<weights stem>.corpus.npz``, see
``openmednet.data.fingerprint``). ``shipped_corpus_fingerprint`` finds that file for an init, and
``check_pretraining_leakage`` compares test hashes with the corpus. ``run_study`` refuses leaky
arms; ``run_finetune`` records the check and warns (or raises with ``leakage="error"``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from openmednet.eval.splits import find_near_duplicates

__all__ = ["check_pretraining_leakage", "shipped_corpus_fingerprint"]


def check_pretraining_leakage(
    test_hashes: np.ndarray, corpus: str | Path, near_threshold: int = 6, *, test_fine: np.ndarray | None = None
) -> list[tuple[int, int, int]]:
    """Pairs ``(test index, corpus index, bits)`` of test images with a near-copy in a corpus.

    Candidates within ``near_threshold`` bits of the 64-bit pHash are confirmed with the 256-bit
    pHash when both sides have it (as the corpus builder and the fine-tuning splits do): small
    images of one standardised view share coarse structure without being copies.

    Args:
        test_hashes: ``(N,)`` uint64 pHashes of the test images (``TargetSet.hashes``).
        corpus: directory of a corpus built by ``openmednet corpus build`` (its shards store the
            pHash of every image), or its fingerprint file (``<weights stem>.corpus.npz``, shipped
            with the weights; see ``openmednet.data.fingerprint``).
        near_threshold: Hamming distance in bits.
        test_fine: ``(N, 4)`` uint64 256-bit pHashes of the test images (``TargetSet.fine_hashes``).

    Raises:
        FileNotFoundError: ``corpus`` is neither a corpus directory nor a fingerprint file.
        ValueError: a damaged fingerprint file.
    """
    from openmednet.data.fingerprint import pretraining_hashes

    phash, fine = pretraining_hashes(corpus)
    return find_near_duplicates(test_hashes, phash, near_threshold, query_fine=test_fine, reference_fine=fine)


def shipped_corpus_fingerprint(init: str, channels: int) -> Path | None:
    """The corpus fingerprint that travels with an init's weights (checksum verified), or ``None``.

    Args:
        init: a ``FinetuneConfig.init`` value.
        channels: the target's channels (``auto`` is ``mednet_gray`` for 1, ``mednet_color`` for 3:
            ``InitSpec.resolve``).

    Raises:
        FileNotFoundError, ValueError: the weights name a fingerprint that is missing or tampered;
            a malformed init or a missing weights path (``InitSpec.parse``).
    """
    from openmednet.models import InitSpec, corpus_fingerprint_file

    spec = InitSpec.parse(init).resolve(channels)
    if spec.kind == "scratch":
        return None
    try:
        return corpus_fingerprint_file(spec.path if spec.kind == "path" else spec.name)
    except KeyError:
        return None  # not a registered name; build_init gives the clear error

"""The corpus builder: many image sources -> one de-duplicated, leakage-free, sharded corpus.

``build_corpus`` (``_build``) runs in four resumable stages, all under ``out_dir/.build/``:

1. **Plan** (``_plan``, ``_census``). Enumerate every source (no pixels decoded) into
   ``plan.jsonl`` with the build parameters in ``params.json``, both written atomically. The plan
   fixes the item order; a restarted build reuses it and refuses to continue with different
   parameters. A census of the plan (``census.json``: items and test-split items per source, the
   channel family of ``CHANNEL_SAMPLE`` decoded items per source, decoded like the sources)
   resolves ``channels="auto"``, refuses explicit channels that would skip most images, and warns
   about sources that look like targets. Before any of it, a source that is an exclusion target is
   refused (``check_sources``, ``_checks``).
2. **Decode** (``_decode``, ``_pool``, ``_targets``). The plan is cut into chunks of
   ``CHUNK_ITEMS`` items; a pool of ``workers`` processes (which die with the build, even on
   SIGKILL, under any start method; a worker killed by a decoder costs only its item) decodes,
   skips tiny and blank images, routes by channel content, normalises and hashes each chunk and
   the build process stores the result as ``chunks/chunk-XXXXX.npz`` (atomically). Chunks already
   on disk are not decoded again. Exclusion targets are hashed the same way into ``targets/``.
3. **Decide** (``openmednet.data.curation``). From the small per-image hash table only (never the
   pixels): drop images matching an excluded target, collapse exact duplicates, assign the corpus
   split, drop evaluation-side near copies of training images (``decide``). Order-independent and
   deterministic.
4. **Write** (``_write``, ``_stats``). Stream the chunks in plan order and write the kept images
   into shards of ``shard_size`` (``openmednet.data.shards.write_shard``: temporary directory,
   then rename). Complete shards of an interrupted run are skipped. The manifest is written last,
   then ``report.md`` and its plots, then the ``.build`` work files are removed.

Memory stays flat in the corpus size: the build process holds one chunk of pixels and one shard
buffer, plus about 60 bytes of hashes and ids per image.

Splitting across machines: ``num_parts=K, part=i`` builds the items whose
``(source, group or path)`` hashes to ``i`` modulo ``K`` (so a patient's images stay in one
part); ``merge_parts`` (``_merge``) then joins the part corpora with the same write loop and
repeats exact and cross-split near de-duplication across parts. See docs/corpus.md.
"""

from openmednet.data.corpus._build import build_corpus
from openmednet.data.corpus._census import CHANNEL_SAMPLE
from openmednet.data.corpus._checks import CorpusWarning, check_sources
from openmednet.data.corpus._decode import GRAY_TOLERANCE, MIN_SIDE
from openmednet.data.corpus._merge import merge_parts
from openmednet.data.corpus._plan import CHUNK_ITEMS, BuildParams, ProgressFn
from openmednet.data.corpus._targets import target_spec

__all__ = [
    "CHANNEL_SAMPLE",
    "CHUNK_ITEMS",
    "GRAY_TOLERANCE",
    "MIN_SIDE",
    "BuildParams",
    "CorpusWarning",
    "ProgressFn",
    "build_corpus",
    "check_sources",
    "merge_parts",
    "target_spec",
]

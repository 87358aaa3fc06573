"""Pre-training MedNet on a built corpus: the composition root of ``openmednet pretrain``.

``run_pretraining(cfg)`` is the only place that reads a ``PretrainConfig``: it builds the backbone,
the objective, the loaders, the optimizer and schedule, the k-NN monitor, and hands plain arguments
to ``engine.loop.fit``. The same call runs in one process or under torchrun::

    openmednet pretrain --corpus corpora/gray64 --out runs/gray-sup --objective supervised
    torchrun --nproc_per_node 8 -m openmednet pretrain --corpus ... --out ... --config configs/x.yaml

Objectives (``objective.kind``), the two credible readings of the paper's unspecified one:

- ``supervised``: multi-source supervised training on every source's labels (RadImageNet's recipe),
  either one softmax over the union of all ``"<source>/<label>"`` classes (``objective.heads=union``)
  or one head per source (``per_source``: a softmax over a source's own classes, so classes of
  different sources never compete). Unlabelled images (label -1) contribute no loss.
- ``simclr``: self-supervised SimCLR on two augmented views; labels are ignored.
- ``combined``: ``sup_weight * supervised + ssl_weight * simclr`` on the same two views; unlabelled
  images contribute to the SSL part only.
- ``distill``: the pooled features of a frozen ImageNet teacher (``objective.teacher``) on the same
  views as the target, or its last feature map per location with ``objective.distill_target=map``
  (``openmednet.ssl.distill``); uses every image, labelled or not.

Parts combine with ``+`` and are weighted by ``sup_weight``, ``ssl_weight`` and ``distill_weight``:
``supervised+distill``, ``simclr+distill``, ``supervised+simclr+distill`` (``combined`` is
``supervised+simclr``). Two views per image whenever SimCLR is a part, else one.

Outputs in ``out``: ``config.yaml`` (resolved config), ``metrics.jsonl``, ``loss.png``,
``checkpoint-last.pt`` and, at the end, the backbone (``num_classes=0``) in ``backbone/``:
``model.safetensors``, ``model_card.json`` and the corpus fingerprint ``model.corpus.npz`` (a folder
that the fine-tuning and prediction commands accept as ``MODEL``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from openmednet._errors import look_up_option
from openmednet.config import changed_fields, dotted, save_config, to_dict
from openmednet.engine.callbacks import CHECKPOINT_LAST
from openmednet.engine.distributed import DistEnv, unwrap_model
from openmednet.engine.loop import fit
from openmednet.engine.pretrain_module import PretrainModule, SupervisedHeads, pretrain_loss

__all__ = [
    "OBJECTIVES",
    "DataSection",
    "ModelSection",
    "MonitorSection",
    "ObjectiveSection",
    "OptimSection",
    "PretrainConfig",
    "PretrainModule",
    "TrainSection",
    "objective_label",
    "run_pretraining",
]

log = logging.getLogger(__name__)

OBJECTIVE_PARTS = ("supervised", "simclr", "distill")
OBJECTIVES = ("supervised", "simclr", "combined", "distill")


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class ModelSection:
    """Backbone: a registered architecture and its width (``num_classes=0``: pooled features);
    ``width_mult=None`` keeps the architecture's own default (0.25 for ``mednet_test``).

    ``init``: a saved backbone (a run's ``backbone/`` folder or a weight set's card) whose weights
    start this run, e.g. the 64 px stage of a progressive 64 -> 128 px schedule; the objective's
    heads start fresh. Its architecture and width must match ``name`` and ``width_mult``.

    ``branch_merge``: MedNet stages whose branch convs run merged (``MedNet.set_branch_merge``):
    the same network and checkpoints, computed faster where ``benchmarks/bench_model.py
    --ablate-only`` shows it; ``()`` (default) runs them separately. ``branch_merge_groups``: the
    kernel sizes each merged conv computes, ``[[1, 3, 5, 7]]`` (one 7x7 conv, default) or
    ``[[1, 3], [5, 7]]`` (a 3x3 and a 7x7 conv: the faster one in bf16, docs/benchmarks.md)."""

    name: str = "mednet_gray"
    width_mult: float | None = None
    init: str | None = None
    branch_merge: tuple[int, ...] = ()
    branch_merge_groups: tuple[tuple[int, ...], ...] = ((1, 3, 5, 7),)


@dataclass(frozen=True)
class DataSection:
    """Loader settings. ``balance`` is passed to ``build_loader`` (``"source"`` or ``"class"`` to
    sample evenly; ``None`` for the corpus' natural mix); ``split=None`` trains on every image."""

    image_size: int = 64
    batch_size: int = 128
    num_workers: int = 2
    balance: str | None = None
    split: str | None = "train"
    drop_last: bool = True
    hflip: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    ssl_crop_scale: tuple[float, float] = (0.2, 1.0)


@dataclass(frozen=True)
class ObjectiveSection:
    """What is minimised (see the module docstring): ``kind`` is one objective or parts joined by
    ``+`` (``supervised+distill``)."""

    @property
    def parts(self) -> frozenset[str]:
        """The objective's parts, e.g. ``{"supervised", "distill"}`` (``combined`` expanded)."""
        return objective_parts(self.kind)

    kind: str = "supervised"
    heads: str = "union"
    ssl_method: str = "simclr"
    temperature: float = 0.2
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    sup_weight: float = 1.0
    ssl_weight: float = 1.0
    label_smoothing: float = 0.0
    teacher: str = "efficientnet_lite0"
    distill_loss: str = "smooth_l1"
    distill_hidden_dim: int = 1024
    distill_weight: float = 1.0
    distill_target: str = "pooled"


@dataclass(frozen=True)
class OptimSection:
    """Optimizer and schedule (``lr`` is for the global batch ``batch_size x grad_accum x world``)."""

    name: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    clip_grad_norm: float | None = None


@dataclass(frozen=True)
class TrainSection:
    """Loop settings. ``deterministic`` turns on ``torch.use_deterministic_algorithms`` (bitwise
    reproducible resume with ``precision=fp32`` and ``num_workers=0``) and, for cuBLAS on CUDA,
    sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless the environment already sets it."""

    epochs: int = 10
    precision: str = "auto"  # bf16 where the hardware runs it natively, else fp32 (engine.precision)
    channels_last: bool = True
    grad_accum: int = 1
    seed: int = 0
    deterministic: bool = False
    max_steps_per_epoch: int | None = None
    checkpoint_every_steps: int = 0
    log_every_steps: int = 10
    progress: bool = True
    tensorboard: bool = False
    device: str | None = None


@dataclass(frozen=True)
class MonitorSection:
    """The k-NN transfer monitor on held-out labelled images (rank 0, after each epoch)."""

    enabled: bool = True
    bank_split: str = "train"
    query_split: str = "val"
    bank_size: int = 1000
    query_size: int = 500
    k: int = 20
    every_epochs: int = 1


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pre-training run needs; load with ``openmednet.config.load_config``.

    ``corpus`` is a directory built by ``openmednet corpus build``; ``out`` the run directory.
    """

    corpus: str = ""
    out: str = ""
    resume: bool = False
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)


def objective_parts(kind: str) -> frozenset[str]:
    """``"supervised+distill"`` -> ``{"supervised", "distill"}``; ``combined`` is supervised+simclr.

    Raises:
        KeyError: an unknown part, with the closest valid name.
        ValueError: an empty or repeated part.
    """
    names = [p.strip() for p in kind.split("+")]
    if len(names) == 1:
        names = {"combined": ["supervised", "simclr"]}.get(look_up_option(names[0], OBJECTIVES, "objective"), names)
    parts = [look_up_option(p, OBJECTIVE_PARTS, "objective part") for p in names if p]
    if len(parts) != len(names) or len(set(parts)) != len(parts):
        raise ValueError(f"objective {kind!r}: parts must be distinct and non-empty, from {OBJECTIVE_PARTS}")
    return frozenset(parts)


# ------------------------------------------------------------------------------------------ builders
def _check_paths(cfg: PretrainConfig) -> tuple[Path, Path]:
    if not cfg.corpus:
        raise ValueError("no corpus given: pass --corpus DIR (a directory built by `openmednet corpus build`)")
    if not cfg.out:
        raise ValueError("no run directory given: pass --out DIR")
    corpus, out = Path(cfg.corpus), Path(cfg.out)
    if not (corpus / "manifest.json").is_file():
        raise FileNotFoundError(f"no corpus at {corpus} (manifest.json missing): build it with `openmednet corpus build`")
    if (out / CHECKPOINT_LAST).is_file() and not cfg.resume:
        raise ValueError(f"{out} already holds a run ({CHECKPOINT_LAST}): pass --resume to continue it or choose a new --out")
    return corpus, out


def _warn_if_starting_afresh(cfg: PretrainConfig, out: Path) -> None:
    """``resume`` without a checkpoint in ``out``: ``fit`` then starts from scratch; say so, because a
    mistyped ``--out`` would otherwise look like a resume (the one place, for the API and the CLI)."""
    if cfg.resume and not (out / CHECKPOINT_LAST).is_file():
        warnings.warn(f"resume: {out} holds no {CHECKPOINT_LAST}, so this run starts from scratch", stacklevel=3)


#: Settings a resumed run cannot change: its checkpoint is of this network, objective and corpus.
RESUME_FIXED = ("corpus", "model", "objective", "data.image_size")


def _check_resume_settings(cfg: PretrainConfig, out: Path) -> None:
    """Compare a resumed run's settings with those its ``config.yaml`` recorded.

    A resume with another model, objective, corpus or image size loaded a checkpoint of another
    network (a size-mismatch traceback) or trained on other data as if nothing had changed;
    other changes (``train.epochs`` to extend a run, the learning rate) went unrecorded, as
    ``config.yaml`` was rewritten. Now the first kind is refused and the second warned about, the
    settings they replace kept as ``config.before-resume-<k>.yaml``.

    Raises:
        ValueError: a change in ``RESUME_FIXED``.
    """
    saved = out / "config.yaml"
    if not (cfg.resume and (out / CHECKPOINT_LAST).is_file() and saved.is_file()):
        return
    before, now = dotted(yaml.safe_load(saved.read_text()) or {}), dotted(to_dict(cfg))
    for flat in (before, now):  # the same corpus folder, however it is written
        flat["corpus"] = str(Path(flat.get("corpus") or "").resolve())
    changed = changed_fields(before, now, ignore=("resume", "out"))
    fixed = [k for k in changed if any(k == f or k.startswith(f + ".") for f in RESUME_FIXED)]
    describe = lambda keys: ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys)  # noqa: E731
    if fixed:
        raise ValueError(f"--resume continues the run in {out}, which has other settings ({describe(fixed)}): resume "
                         f"with its settings ({saved}), or start a new --out (model.init={out}/backbone starts from "
                         f"its weights once it has finished)")
    if changed:
        k = 1 + len(list(out.glob("config.before-resume-*.yaml")))
        shutil.copyfile(saved, out / f"config.before-resume-{k}.yaml")
        warnings.warn(f"resuming {out} with changed settings ({describe(changed)}); the earlier ones are kept in "
                      f"config.before-resume-{k}.yaml", stacklevel=3)


def build_backbone(cfg: PretrainConfig, channels: int) -> nn.Module:
    """The backbone with pooled-feature output, checked against the corpus' channel count."""
    from openmednet.models import create_model, load_pretrained

    try:
        backbone = create_model(cfg.model.name, num_classes=0, width_mult=cfg.model.width_mult)
    except TypeError as e:  # the model's constructor has no width_mult (every timm baseline)
        if "width_mult" not in str(e):
            raise
        raise ValueError(f"model.width_mult={cfg.model.width_mult} scales MedNet's widths; '{cfg.model.name}' has no "
                         f"such setting: set model.width_mult to null (--set model.width_mult=null)") from None
    if cfg.model.init:
        start = load_pretrained(cfg.model.init, num_classes=0)
        if start.model_args() != backbone.model_args():
            raise ValueError(
                f"model.init {cfg.model.init} holds {start.model_args()}, but this run builds "
                f"'{cfg.model.name}' with {backbone.model_args()}: set model.name/width_mult to match"
            )
        backbone.load_state_dict(start.state_dict())
    if not cfg.model.branch_merge and tuple(map(tuple, cfg.model.branch_merge_groups)) != ModelSection.branch_merge_groups:
        raise ValueError(f"model.branch_merge_groups {cfg.model.branch_merge_groups} has no effect without "
                         f"model.branch_merge (the stages to merge, e.g. [1, 2])")
    if cfg.model.branch_merge:
        if not hasattr(backbone, "set_branch_merge"):
            raise ValueError(f"model.branch_merge merges MedNet's branch convs; '{cfg.model.name}' has none: "
                             f"remove model.branch_merge")
        backbone.set_branch_merge(cfg.model.branch_merge, cfg.model.branch_merge_groups)
    in_chans = getattr(backbone, "in_chans", channels)
    if in_chans != channels:
        raise ValueError(
            f"model '{cfg.model.name}' takes {in_chans}-channel input but the corpus stores {channels}-channel "
            f"images: use {'mednet_gray' if channels == 1 else 'mednet_color'} (model.name) for this corpus"
        )
    return backbone


def build_objective(
    cfg: PretrainConfig, backbone: nn.Module, label_names: list[str], distributed: bool
) -> tuple:
    """``(SupervisedHeads | None, SSL objective | None, FeatureDistillation | None)`` for
    ``cfg.objective.kind``; the teacher (distillation) is built on every rank."""
    o = cfg.objective
    parts = o.parts
    num_features = backbone.num_features
    sup = ssl = distill = None
    if "supervised" in parts:
        sup = SupervisedHeads(num_features, label_names, o.heads, o.label_smoothing)
    if "distill" in parts:
        from openmednet.ssl.distill import FeatureDistillation, build_teacher

        contract = backbone.pretrained_cfg
        distill = FeatureDistillation(
            build_teacher(o.teacher), num_features, contract.mean, contract.std,
            hidden_dim=o.distill_hidden_dim, loss=o.distill_loss, target=o.distill_target,
        )
    if "simclr" in parts:
        from openmednet.ssl import build_ssl_objective

        ssl = build_ssl_objective(
            o.ssl_method, num_features, hidden_dim=o.proj_hidden_dim, out_dim=o.proj_dim,
            temperature=o.temperature, gather_distributed=distributed,
        )
    return sup, ssl, distill


def build_train_transform(cfg: PretrainConfig, contract: Any) -> Any:
    """One augmented view (supervised) or two (SimCLR, combined)."""
    from openmednet.data.transforms import build_multiview_transform, build_transform

    d = cfg.data
    kw = {"image_size": d.image_size, "hflip": d.hflip}
    if "simclr" not in cfg.objective.parts:
        return build_transform(contract, True, crop_scale=tuple(d.crop_scale), **kw)
    return build_multiview_transform(contract, views=2, crop_scale=tuple(d.ssl_crop_scale), **kw)


def build_monitor(cfg: PretrainConfig, corpus: Path, contract: Any) -> Any:
    """A ``KnnMonitor`` over labelled images of two splits, or ``None`` (disabled or no labels)."""
    from openmednet.data.shards import SPLITS, CorpusArrays
    from openmednet.data.transforms import build_transform
    from openmednet.engine.monitor import KnnMonitor

    m = cfg.monitor
    if not m.enabled:
        return None
    arrays = CorpusArrays(corpus)
    transform = build_transform(contract, False, image_size=cfg.data.image_size)
    # A private generator: the monitor must not draw from the global RNGs (exact resume).
    rng = np.random.default_rng(cfg.train.seed)
    picked = []
    for split, size in ((m.bank_split, m.bank_size), (m.query_split, m.query_size)):
        split_id = SPLITS.index(look_up_option(split, SPLITS, "monitor split"))
        idx = np.flatnonzero((arrays.split == split_id) & (arrays.label >= 0))
        picked.append(np.sort(rng.choice(idx, size=min(size, len(idx)), replace=False)) if len(idx) else idx)
    if any(len(p) == 0 for p in picked):
        warnings.warn(
            f"k-NN monitor disabled: the corpus has {len(picked[0])} labelled '{m.bank_split}' and "
            f"{len(picked[1])} labelled '{m.query_split}' images (needs both)", stacklevel=2,
        )
        return None

    def load(idx: np.ndarray) -> tuple[Tensor, Tensor]:
        images = torch.stack([transform(torch.from_numpy(arrays.image(int(i)))) for i in idx])
        return images, torch.from_numpy(arrays.label[idx].astype(np.int64))

    (bank, bank_labels), (query, query_labels) = load(picked[0]), load(picked[1])
    return KnnMonitor(bank, bank_labels, query, query_labels, k=m.k)


def _export_backbone(backbone: nn.Module, out: Path, cfg: PretrainConfig, corpus: Path, metrics: dict) -> None:
    """Write ``out/backbone/``: weights, model card (input contract at the trained size, objective,
    final metrics) and the corpus fingerprint."""
    from openmednet.data.fingerprint import save_corpus_fingerprint
    from openmednet.models._weights import save_pretrained

    contract_size = (getattr(backbone, "in_chans", 1), cfg.data.image_size, cfg.data.image_size)

    # The corpus' pHashes travel with the weights, so users without the corpus can still check
    # that their test images were not pre-trained on (see openmednet.data.fingerprint).
    fingerprint = out / "backbone" / "model.corpus.npz"
    save_corpus_fingerprint(corpus, fingerprint)
    save_pretrained(
        backbone, out / "backbone", architecture=cfg.model.name, data=(corpus.name,),
        objective=objective_label(cfg.objective),
        epochs=cfg.train.epochs, metrics=metrics, input_size=contract_size, corpus_fingerprint=fingerprint,
    )


def objective_label(o: ObjectiveSection) -> str:
    """The card's ``objective``: ``supervised/union``, ``simclr``, ``supervised/union+distill(efficientnet_lite0)``,
    ``distill(efficientnet_lite0, map)`` (the map target is named; the pooled default is not, so
    existing cards keep their label)."""
    parts = o.parts
    teacher = o.teacher if o.distill_target == "pooled" else f"{o.teacher}, {o.distill_target}"
    label = "+".join(
        f"supervised/{o.heads}" if p == "supervised" else f"distill({teacher})" if p == "distill" else p
        for p in OBJECTIVE_PARTS if p in parts
    )
    return "combined/" + o.heads if o.kind == "combined" else label


# --------------------------------------------------------------------------------------------- run
def run_pretraining(cfg: PretrainConfig, *, callbacks: tuple = ()) -> list[dict[str, float]]:
    """Pre-train a backbone on ``cfg.corpus`` and write the run to ``cfg.out``.

    Runs as one process or as one rank of a torchrun job (``DistEnv.from_env``); only rank 0 writes.

    Args:
        cfg: resolved config.
        callbacks: called after each optimizer step with the ``TrainState`` and the model (custom
            hooks, tests).

    Returns:
        The epoch records of this invocation (as written to ``metrics.jsonl``).

    Raises:
        FileNotFoundError: corpus missing.
        ValueError: bad settings (channels mismatch, existing run without ``resume``...).
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).

    Warns:
        UserWarning: ``resume`` is set but ``out`` holds no checkpoint, so the run starts from scratch.
    """
    from openmednet.data.datasets import CorpusDataset
    from openmednet.data.loader import build_loader
    from openmednet.data.shards import CorpusManifest
    from openmednet.engine.optim import build_optimizer, build_scheduler
    from openmednet.utils import seed_everything

    corpus, out = _check_paths(cfg)
    t = cfg.train
    dist = DistEnv.from_env(device=t.device)
    if dist.is_main:
        _warn_if_starting_afresh(cfg, out)
        _check_resume_settings(cfg, out)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    # Deterministic cuBLAS needs a fixed workspace, configured before its first matmul (torch raises
    # there otherwise; unused on CPU). A value already in the environment wins.
    set_cublas = t.deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        if t.deterministic:
            if set_cublas:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
            torch.use_deterministic_algorithms(True)
        manifest = CorpusManifest.load(corpus)
        seed_everything(t.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        backbone = build_backbone(cfg, manifest.channels)
        sup, ssl, distill = build_objective(cfg, backbone, manifest.label_names, dist.is_distributed)
        o = cfg.objective
        module = PretrainModule(backbone, sup, ssl, o.sup_weight, o.ssl_weight, distill, o.distill_weight)
        if t.channels_last:  # before DDP wraps the parameters into its gradient buckets
            module = module.to(memory_format=torch.channels_last)
        model = dist.wrap_model(module)
        contract = backbone.pretrained_cfg
        # A supervised-only run skips unlabelled images: they would cost compute for a zero loss.
        dataset = CorpusDataset(
            corpus, cfg.data.split, build_train_transform(cfg, contract),
            labelled_only=cfg.objective.parts == {"supervised"},
        )
        loader = build_loader(
            dataset, batch_size=cfg.data.batch_size, world_size=dist.world_size, rank=dist.rank,
            seed=t.seed, balance=cfg.data.balance, num_workers=cfg.data.num_workers, drop_last=cfg.data.drop_last,
        )
        if len(loader) == 0:
            raise ValueError(
                f"{len(dataset)} training images cannot fill one batch of {cfg.data.batch_size} per rank on "
                f"{dist.world_size} rank(s): lower data.batch_size or set data.drop_last=false"
            )
        steps_per_epoch = math.ceil(len(loader) / t.grad_accum)
        if t.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
        o = cfg.optim
        optimizer = build_optimizer(module, o.name, o.lr, o.weight_decay, o.momentum)
        scheduler = build_scheduler(
            optimizer, t.epochs * steps_per_epoch, round(o.warmup_epochs * steps_per_epoch), o.min_lr_ratio
        )
        monitor = build_monitor(cfg, corpus, contract) if dist.is_main else None
        if dist.is_main:
            save_config(cfg, out / "config.yaml")
        # Different augmentation streams per rank (the sampler already gives different images).
        seed_everything(t.seed + dist.rank)
        history = fit(
            model, loader, optimizer, pretrain_loss, epochs=t.epochs, dist=dist, run_dir=out,
            scheduler=scheduler, precision=t.precision, channels_last=t.channels_last, grad_accum=t.grad_accum,
            max_steps_per_epoch=t.max_steps_per_epoch, clip_grad_norm=o.clip_grad_norm,
            checkpoint_every_steps=t.checkpoint_every_steps, log_every_steps=t.log_every_steps,
            resume=cfg.resume, monitor=monitor, monitor_every_epochs=cfg.monitor.every_epochs,
            checkpoint_meta={
                "model_name": cfg.model.name, "model_args": backbone.model_args(), "config": to_dict(cfg),
                "extra": {"label_names": list(manifest.label_names)},
            },
            callbacks=callbacks, progress=t.progress and dist.is_main, tensorboard=t.tensorboard,
        )
        if dist.is_main:
            # From the log, not ``history``: a resumed run that only had the export left has no history.
            from openmednet.engine.plots import read_metrics

            epochs = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "epoch"]
            final = {k: v for k, v in (epochs[-1] if epochs else {}).items() if isinstance(v, float)}
            _export_backbone(unwrap_model(model).backbone, out, cfg, corpus, final)
        dist.barrier()
        return history
    finally:
        torch.use_deterministic_algorithms(was_deterministic)  # do not leak global state to the caller
        if set_cublas:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        dist.destroy()

"""``FinetuneConfig``: what a fine-tuning run needs, checked on construction; ``FinetuneResult``: what it made."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openmednet._errors import look_up_option
from openmednet.engine.optim import OPTIMIZERS
from openmednet.engine.trainer import PRECISIONS
from openmednet.eval.strategies import STRATEGIES

__all__ = ["LEAKAGE_POLICIES", "TASKS", "FinetuneConfig", "FinetuneResult"]

LEAKAGE_POLICIES = ("drop", "error")
#: ``classification`` (labels.csv targets) or ``segmentation`` (masks.csv targets, ``eval.segmentation``).
TASKS = ("classification", "segmentation")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run needs; stops at ``run_finetune`` (the composition root).

    Attributes:
        data: target folder (labels.csv or class sub-folders), ``.npz``, or CSV folder.
        out: run directory (created).
        init: see the module docstring.
        arch: architecture of a bare weights file given as ``init``.
        strategy: ``full``, ``linear_probe``, ``freeze_k`` or ``meanvar``.
        freeze_k: blocks frozen after the stem for ``freeze_k``.
        epochs: maximum epochs.
        patience: stop after this many epochs without a better validation score.
        min_epochs: warm-up epochs that model choice and patience ignore (their validation scores
            are still logged); see ``engine.callbacks.EarlyStopping``. 0 (default): choose from epoch 1.
        batch_size: images per step.
        lr: learning rate of the backbone (the survey found 1e-4 -> 1e-5 steadier for big nets).
        head_lr_mult: learning-rate multiplier of the new head (MedNet's authors: 10x).
        weight_decay: decay of conv/linear weights.
        optimizer: ``adamw``, ``sgd`` or ``lars``.
        warmup_epochs: linear warm-up before the cosine decay.
        image_size: input side; ``None`` uses the init's contract.
        class_weighted: weight the loss by inverse class frequency (sklearn's "balanced").
        label_fraction: train on this fraction of each class of the train split.
        per_class: or on exactly this many images per class (few-shot).
        seed: run seed (few-shot subset, init of the head, data order, augmentation).
        given_splits: use the source's train/val/test column; ``False`` draws new splits (e.g. for
            Open-i, whose given test split has 2 images).
        split_seed: seed of drawn splits; keep it fixed across runs of one study.
        val_fraction, test_fraction: sizes of drawn validation / test splits.
        leakage: what to do with train/val images that are near-copies of test images:
            ``drop`` them (test stays untouched) or raise (``error``). Test images found in the
            init's pre-training corpus cannot be dropped (the test split is never changed to suit
            an init): ``drop`` then warns and sets ``metrics["test_leaked_in_pretraining"]``,
            ``error`` raises; ``openmednet study`` refuses such inits.
        near_threshold: pHash bits within which two images are near-copies.
        hflip: random horizontal flips (turn off for laterality labels).
        n_boot: bootstrap resamples for the test intervals (0 = none).
        format, csv_file, columns, label_map, classes: how to read ``data`` (see ``load_target``).
        max_side: shorter-side cap of images kept in memory; keep it >= the input size (raise it
            to 299 or more for InceptionV3), or images are upsampled from this size.
        precision: ``auto`` (bf16 where the CPU/GPU runs it natively, else fp32; see
            ``openmednet.engine.precision``), ``fp32``, ``bf16`` (CPU or GPU; warned where
            emulated, about 9x slower than fp32 on an AVX2-only CPU) or ``fp16`` (GPU) for
            training; evaluation (validation and test) always runs in fp32. The resolved value is
            recorded in ``metrics.json`` (``model.precision``).
        channels_last: feed training batches in NHWC memory format; ``None`` follows the resolved
            precision (on with bf16). With ``bf16`` on a CPU with AVX512-BF16, a MedNet run is 1.6x
            faster; EfficientNet-Lite0 is 0.87x, i.e. slower (docs/benchmarks.md, "Fine-tuning
            precision").
        num_workers: DataLoader worker processes.
        device: ``cpu``, ``cuda`` or ``None`` (CUDA if available).
        task: ``classification`` or ``segmentation`` (``data`` holds masks.csv + classes.txt; a
            U-Net on the init's encoder, see ``openmednet.eval.segmentation``; strategy ``full``).
        semi: ``none``, ``pseudo_label``, ``fixmatch`` or ``freematch``; ``unlabelled`` (folders, or
            ``rest_of_train``), ``rounds``, ``semi_threshold``, ``pseudo_selection``,
            ``pseudo_fraction``, ``student_dropout``, ``mu``, ``lambda_u``, ``strong_magnitude``,
            ``max_unlabelled``, ``sat_momentum``, ``lambda_f``: semi-supervised fine-tuning, see
            ``openmednet.eval.semi``.
    """

    data: Path
    out: Path
    init: str = "auto"
    arch: str | None = None
    strategy: str = "full"
    freeze_k: int = 0
    epochs: int = 40
    patience: int = 10
    min_epochs: int = 0
    batch_size: int = 32
    lr: float = 1e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    warmup_epochs: int = 1
    image_size: int | None = None
    class_weighted: bool = True
    label_fraction: float | None = None
    per_class: int | None = None
    seed: int = 0
    given_splits: bool = True
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    leakage: str = "drop"
    near_threshold: int = 6
    hflip: bool = True
    n_boot: int = 1000
    format: str = "auto"
    csv_file: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    label_map: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None
    max_side: int | None = 256
    precision: str = "auto"
    channels_last: bool | None = None
    num_workers: int = 0
    device: str | None = None
    task: str = "classification"
    semi: str = "none"
    unlabelled: tuple[str, ...] = ()
    rounds: int = 1
    semi_threshold: float = 0.95
    pseudo_selection: str = "class_balanced"
    pseudo_fraction: float = 0.5
    student_dropout: float = 0.5
    mu: int = 2
    lambda_u: float = 1.0
    strong_magnitude: int = 9
    max_unlabelled: int | None = None
    sat_momentum: float = 0.9
    lambda_f: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        look_up_option(self.strategy, STRATEGIES, "strategy")
        look_up_option(self.task, TASKS, "task")
        look_up_option(self.leakage, LEAKAGE_POLICIES, "leakage policy")
        look_up_option(self.precision, PRECISIONS, "precision")
        look_up_option(self.optimizer, OPTIMIZERS, "optimizer")
        from openmednet.eval.semi import check_semi_config

        check_semi_config(self)
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError(f"epochs, patience and batch_size must be >= 1, got {self.epochs}, {self.patience}, {self.batch_size}")
        if not 0 <= self.min_epochs < self.epochs:
            raise ValueError(f"min_epochs must be in [0, epochs) so that some epoch can be chosen, got min_epochs="
                             f"{self.min_epochs} with epochs={self.epochs}")
        if self.freeze_k < 0 or self.warmup_epochs < 0 or self.num_workers < 0:
            raise ValueError(f"freeze_k, warmup_epochs and num_workers must be >= 0, got "
                             f"{self.freeze_k}, {self.warmup_epochs}, {self.num_workers}")
        if self.label_fraction is not None and self.per_class is not None:
            raise ValueError("give label_fraction or per_class, not both")
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must lie in (0, 1], got {self.label_fraction}")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {self.per_class}")
        # None means "the init's contract"; 0 used to mean that too, silently, while config.yaml said 0.
        for name in ("image_size", "max_side"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or unset (null), got {getattr(self, name)}")


@dataclass
class FinetuneResult:
    """What ``run_finetune`` produced: the run directory and the content of ``metrics.json``."""

    out: Path
    metrics: dict[str, Any]

"""MedNet: a CNN for medical image pre-training (Alzubaidi et al., 2021).

Paper: L. Alzubaidi et al., "MedNet: Pre-trained Convolutional Neural Network Model for the Medical
Imaging Tasks", arXiv:2110.06512 (2021). Where the paper is silent, the authors' predecessor model
(the hybrid parallel-convolution networks of their 2020-2021 case studies) fills in.

Layout (``width_mult=1``; ``s`` = output stride, widths are output channels)::

    stem     3x3 conv s1 (16) -> 5x5 conv s2 (32)                               s2,  32 ch
    stage 1  block 1 (32 + stem identity)  block 2 (32 + stem identity)         s2,  64 ch
    stage 2  block 3 (64, stride 2)        block 4 (64)                         s4,  80 / 96 ch
    stage 3  block 5 (128, stride 2)       block 6 (128)                        s8,  160 / 192 ch
    stage 4  block 7 (256, stride 2)       block 8 (256)                        s16, 320 / 448 ch
    head     global average pool -> FC 200 -> ReLU -> dropout 0.5 -> FC num_classes

Each block runs four parallel conv-BN-ReLU branches (1x1, 3x3, 5x5, 7x7) of ``width/4`` channels
and concatenates them with its incoming connections, followed by BN (``MultiBranchBlock``).
``MedNet.set_branch_merge`` can run a stage's branch convs as one conv, an execution option that
leaves the network and its ``state_dict`` as they are.

Connections (12, see ``CONNECTIONS``): every block receives the output of the block two before it
(the stem counting as "block 0" for blocks 1 and 2) -- eight short connections -- plus four long
ones (stem -> 4, 2 -> 6, 4 -> 8, stem -> 8). The two connections from the stem into stage 1 are
identity links, as in the predecessor where the stem output joins block 1's concatenation
unchanged; the other ten carry one 1x1 convolution each (after average pooling when the resolution
drops). Convolutions: 2 (stem) + 8 x 4 (branches) + 10 (connections) = 44, the paper's count.

Choices the paper leaves open, and why:
- Widths 32-64-128-256 (doubling at each down-sampling block, starting at the predecessor's 32).
  With four branches of ``w/4`` channels a block costs about ``21 * C_in * w`` MACs per output
  pixel, close to a ResNet basic block's ``18 * C^2``: eight blocks cost about what ResNet-18 does.
- Down-sampling in the stem and in the first block of stages 2-4: output stride 16, so a 64 px
  input still has a 4x4 last map (Grad-CAM needs some resolution) and 224 px gives 14x14.
  The smallest input is 17 px, the first size with a 2x2 last map, so MedMNIST's native
  28 px images fit without upsampling.
- Connection widths ``w_dst/4`` (one branch's worth), so joining features stays cheap.
- ``width_mult`` scales every width (rounded to a multiple of 8, so branches stay whole): the same
  design runs on a CPU at 64 px (``mednet_test`` uses 0.25) and on GPUs at 224 px.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from openmednet.models._pretrained import PretrainedCfg
from openmednet.models._registry import register_model, register_pretrained_cfgs
from openmednet.models.layers import ClassifierHead, ConvBnAct, MultiBranchBlock, SkipConnector, check_branch_groups

__all__ = ["MedNet", "Connection", "CONNECTIONS", "mednet_gray", "mednet_color", "mednet_test"]


@dataclass(frozen=True)
class Connection:
    """One inter-block connection: output of ``src`` (0 = stem) joins block ``dst``'s concatenation."""

    src: int
    dst: int
    kind: str  # "short" (skips one block) or "long"
    identity: bool = False


CONNECTIONS: tuple[Connection, ...] = (
    Connection(0, 1, "short", identity=True),
    Connection(0, 2, "short", identity=True),
    Connection(1, 3, "short"),
    Connection(2, 4, "short"),
    Connection(3, 5, "short"),
    Connection(4, 6, "short"),
    Connection(5, 7, "short"),
    Connection(6, 8, "short"),
    Connection(0, 4, "long"),
    Connection(2, 6, "long"),
    Connection(4, 8, "long"),
    Connection(0, 8, "long"),
)

STAGE_WIDTHS = (32, 64, 128, 256)
STEM_WIDTHS = (16, 32)
BLOCKS_PER_STAGE = 2
#: Branch groupings for ``MedNet.set_branch_merge``: all four branches in one 7x7 conv, or the
#: 1x1 with the 3x3 (one 3x3 conv) and the 5x5 with the 7x7 (one 7x7 conv).
ALL_BRANCHES: tuple[tuple[int, ...], ...] = ((1, 3, 5, 7),)
PAIRED_BRANCHES: tuple[tuple[int, ...], ...] = ((1, 3), (5, 7))
MIN_INPUT_SIZE = 17  # ceil(17 / 16) = 2: the smallest input with a 2x2 last map


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), as in timm."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:  # never round down by more than 10%
        new += divisor
    return new


class MedNet(nn.Module):
    """MedNet classifier / feature extractor (see the module docstring for the layout).

    Args:
        in_chans: input channels: 1 for Gray-MedNet, 3 for Color-MedNet.
        num_classes: classifier outputs; 0 returns pooled features ``(B, num_features)``.
        width_mult: multiplier on every width (1.0 = 32-64-128-256).
        drop_rate: dropout between the two FC layers (paper's predecessor: 0.5).
        head_hidden_size: units of the first FC layer (predecessor: 200).
        global_pool: only ``"avg"`` (the paper's global average pooling).

    Input contract: ``(B, in_chans, H, W)`` float with ``H, W >= 17``, finite values, normalised as
    the weights' ``pretrained_cfg`` says. ``forward`` raises ``ValueError`` otherwise, instead of
    silently resizing or converting (transforms do the preprocessing).
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        drop_rate: float = 0.5,
        head_hidden_size: int = 200,
        global_pool: str = "avg",
    ):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"global_pool must be 'avg' (the paper's GAP), got '{global_pool}'")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.width_mult = width_mult
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        self.connections_spec = CONNECTIONS
        self.min_input_size = MIN_INPUT_SIZE

        stem1, stem2 = (make_divisible(w * width_mult) for w in STEM_WIDTHS)
        self.stem = nn.Sequential()
        self.stem.add_module("conv1", ConvBnAct(in_chans, stem1, 3, stride=1))
        self.stem.add_module("conv2", ConvBnAct(stem1, stem2, 5, stride=2))

        widths = [make_divisible(w * width_mult) for w in STAGE_WIDTHS for _ in range(BLOCKS_PER_STAGE)]
        strides = [2 if i > 0 and i % BLOCKS_PER_STAGE == 0 else 1 for i in range(len(widths))]

        # Walk the blocks in order, recording each output's channels and stride so connections
        # can be sized: index 0 is the stem output.
        out_chs = {0: stem2}
        reductions = {0: 2}
        self.blocks = nn.ModuleList()
        self.connections = nn.ModuleDict()
        self._incoming: list[list[str]] = []
        for b, (width, stride) in enumerate(zip(widths, strides), start=1):
            reduction = reductions[b - 1] * stride
            conn_chs, keys = [], []
            for c in (c for c in CONNECTIONS if c.dst == b):
                key = f"c{c.src}_{c.dst}"
                conn = SkipConnector(
                    out_chs[c.src], width // 4, stride=reduction // reductions[c.src], identity=c.identity
                )
                self.connections[key] = conn
                conn_chs.append(conn.out_chs)
                keys.append(key)
            block = MultiBranchBlock(out_chs[b - 1], width, stride, tuple(conn_chs))
            self.blocks.append(block)
            self._incoming.append(keys)
            out_chs[b], reductions[b] = block.out_chs, reduction

        self.num_features = out_chs[len(widths)]
        self.head_hidden_size = head_hidden_size
        self.head = ClassifierHead(self.num_features, num_classes, head_hidden_size, drop_rate)
        # Stage outputs, for Grad-CAM and dense tasks (timm's feature_info convention: one entry per
        # reduction, the last module at it). The stem shares stage 1's stride 2 and is left out, so
        # reductions double from entry to entry (2, 4, 8, 16), as segmentation decoders expect.
        self.feature_info = [
            dict(num_chs=out_chs[b], reduction=reductions[b], module=f"blocks.{b - 1}")
            for b in range(BLOCKS_PER_STAGE, len(widths) + 1, BLOCKS_PER_STAGE)
        ]
        self.pretrained_cfg: PretrainedCfg | None = None
        self.is_fused = False  # set on the copies made by fuse_for_inference
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------- input contract
    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` if ``x`` breaks the input contract (see class docstring).

        Shape checks are static; the finiteness check is skipped while tracing/exporting.
        """
        check_input(x, self.in_chans, self.min_input_size)

    # ----------------------------------------------------------------------------- forward
    def iter_outputs(self, x: Tensor, num_blocks: int | None = None) -> Iterator[Tensor]:
        """Yield the stem output, then the output of each block in order (checks ``x`` first).

        Args:
            x: ``(B, in_chans, H, W)``.
            num_blocks: stop after this many blocks (default: all).

        Yields:
            ``num_blocks + 1`` tensors; block ``b`` (1-based) has ``ceil(H / r_b)`` rows, with
            ``r_b`` its ``feature_info``-style reduction. Stopping the iteration early skips the
            remaining blocks' compute (``MedNetFeatures`` uses this).
        """
        self.check_input(x)
        yield from run_blocks(self.stem, self.blocks, self.connections, self._incoming, x, num_blocks)

    @staticmethod
    def connections_spec_src(key: str) -> int:
        """Source index of connection ``key`` (``"c4_8"`` -> 4)."""
        return int(key[1:].split("_")[0])

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W) -> (B, num_features, ceil(H/16), ceil(W/16))``."""
        for out in self.iter_outputs(x):
            pass
        return out

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs described by ``feature_info``, with timm's ``forward_intermediates`` signature.

        Args:
            x: ``(B, in_chans, H, W)``.
            indices: ``feature_info`` entries to return: ``None`` = all four stages, an int ``n`` =
                the last ``n``, or a sequence of indices (negative counts from the end).
            norm: accepted for timm compatibility; MedNet has no final norm, so it changes nothing.
            stop_early: stop after the last requested stage (the returned final map is then that
                stage's, as in timm).
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of stage maps.

        Returns:
            ``[(B, C_i, ceil(H/r_i), ceil(W/r_i)) for each index]`` with ``C_i, r_i`` from
            ``feature_info`` (reductions 2, 4, 8, 16), preceded by the final feature map
            ``(B, num_features, ceil(H/16), ceil(W/16))`` unless ``intermediates_only``.

        Raises:
            ValueError: an index is out of range, or ``output_fmt`` is not ``"NCHW"``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"MedNet returns NCHW feature maps, got output_fmt={output_fmt!r}")
        take = take_indices(len(self.feature_info), indices)
        stage_block = [int(info["module"].split(".")[1]) + 1 for info in self.feature_info]
        wanted = {stage_block[i]: i for i in take}
        last = max(wanted) if (stop_early or intermediates_only) else len(self.blocks)
        maps: dict[int, Tensor] = {}
        for b, out in enumerate(self.iter_outputs(x, last)):
            if b in wanted:
                maps[wanted[b]] = out
        intermediates = [maps[i] for i in take]
        return intermediates if intermediates_only else (out, intermediates)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``(B, num_features, h, w) -> (B, num_classes)`` logits, or pooled ``(B, num_features)``."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` (softmax is left to the loss / ``predict``)."""
        return self.forward_head(self.forward_features(x))

    # ----------------------------------------------------------------------------- timm contract
    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """Replace the two FC layers for ``num_classes`` outputs (0 = pooled features)."""
        if global_pool != "avg":
            raise ValueError(f"global_pool must be 'avg', got '{global_pool}'")
        self.num_classes = num_classes
        self.head.reset(num_classes)

    # ----------------------------------------------------------------------------- execution options
    def set_branch_merge(self, stages: Sequence[int] = (1,), groups: Sequence[Sequence[int]] = ALL_BRANCHES) -> MedNet:
        """Run each group of branch convs of the blocks in ``stages`` as one conv (``()``: none); returns self.

        The same network computed another way (``MultiBranchBlock.merged_branches``): per group,
        one zero-padded conv whose weight is rebuilt from the branch weights at every call, and
        one ``batch_norm`` that uses and updates each branch BN's statistics exactly as the
        separate BNs do. Parameters, ``state_dict``, ``model_args`` and checkpoints are unchanged,
        and so is the setting's absence from them: a loaded model runs its branches separately
        until this is called again. Outputs and gradients match the separate branches to float
        rounding (``tests/models/test_branch_merge.py``).

        When it pays: merging buys wider convs at the cost of the zero-padded FLOPs (2.33x the
        branch FLOPs for all four branches in one 7x7 conv, 1.38x for ``PAIRED_BRANCHES``, a 3x3
        and a 7x7 conv). It helps where the branches are narrowest (stage 1: ``8 * width_mult``
        channels each on the largest maps) and loses in the later stages; which grouping wins
        depends on the CPU and precision (``docs/benchmarks.md``, "stage 1" and "Training step in
        bf16"). Measure with ``benchmarks/bench_model.py --ablate-only`` on your hardware before
        turning it on. Off by default; ``fuse_for_inference`` copies run the branches separately.

        Args:
            stages: 1-based stage numbers (1-4; each stage is two blocks).
            groups: kernel sizes per conv, splitting ``(1, 3, 5, 7)`` in order: ``ALL_BRANCHES``
                (one 7x7 conv, the default) or ``PAIRED_BRANCHES`` (``((1, 3), (5, 7))``), etc.

        Raises:
            ValueError: a stage outside 1-4, or groups that do not split ``(1, 3, 5, 7)`` in order.
            TypeError: an int instead of a sequence.
        """
        num_stages = len(self.blocks) // BLOCKS_PER_STAGE
        if isinstance(stages, int):
            raise TypeError(f"stages is a sequence of stage numbers, e.g. ({stages},), got {stages}")
        stages = tuple(sorted(set(stages)))
        if any(not isinstance(s, int) or not 1 <= s <= num_stages for s in stages):
            raise ValueError(f"branch-merge stages are 1..{num_stages} (two blocks each), got {stages}")
        groups = check_branch_groups(groups, MultiBranchBlock.kernel_sizes)
        for b, block in enumerate(self.blocks):
            block.merge_groups = groups if b // BLOCKS_PER_STAGE + 1 in stages else ()
        return self

    @property
    def branch_merge_stages(self) -> tuple[int, ...]:
        """The stages whose branches run merged (``set_branch_merge``); ``()`` = all separate."""
        return tuple(sorted({b // BLOCKS_PER_STAGE + 1 for b, block in enumerate(self.blocks) if block.merge_branches}))

    # ----------------------------------------------------------------------------- inference path
    def fuse_for_inference(self) -> MedNet:
        """An eval-only copy with every conv-BN pair folded into one conv (same outputs, faster).

        The 34 ``ConvBnAct`` (stem and branches) and the 10 convolutional connections get their
        BatchNorm folded into the convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``); the
        block's post-concatenation BN stays (a ReLU separates it from the branch convs). This model
        is left untouched, so its ``state_dict`` layout (what checkpoints and weight files hold)
        does not change; the copy has conv biases and no branch BN keys, so save the original.
        Outputs match the original in eval mode to float rounding (``tests/models``), and
        ``benchmarks/bench_model.py`` measures the speed-up.

        Returns:
            A new ``MedNet`` in eval mode with gradients disabled; calling ``.train()`` on it raises.
        """
        fused = copy.deepcopy(self).eval().set_branch_merge(())  # the branch BNs are folded away
        for m in fused.modules():
            if isinstance(m, (ConvBnAct, SkipConnector)):
                m.fold_bn_()
        fused.requires_grad_(False)
        fused.is_fused = True
        return fused

    def train(self, mode: bool = True) -> MedNet:
        """As ``nn.Module.train``; refuses ``mode=True`` on a ``fuse_for_inference`` copy.

        A folded model has no BatchNorm left in its branches, so training it would silently train
        a different network.
        """
        if mode and getattr(self, "is_fused", False):
            raise ValueError(
                "this MedNet was fused for inference (BatchNorm folded) and cannot be trained: "
                "train the original model and call fuse_for_inference() again afterwards"
            )
        return super().train(mode)

    def model_args(self) -> dict[str, Any]:
        """Constructor arguments, to rebuild this model (stored in checkpoints and model cards)."""
        return dict(
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            width_mult=self.width_mult,
            drop_rate=self.drop_rate,
            head_hidden_size=self.head_hidden_size,
            global_pool=self.global_pool,
        )

    @property
    def default_cfg(self) -> PretrainedCfg | None:
        """timm's backwards-compatible alias of ``pretrained_cfg`` (timm's own models carry both)."""
        return self.pretrained_cfg


def count_convs(model: nn.Module) -> int:
    """Number of ``nn.Conv2d`` layers in ``model``."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def output_size(size: int, stride: int = 16) -> int:
    """Spatial size of MedNet's last feature map for an input of ``size`` pixels."""
    for _ in range(int(math.log2(stride))):
        size = math.ceil(size / 2)
    return size


def check_input(x: Tensor, in_chans: int, min_input_size: int = MIN_INPUT_SIZE) -> None:
    """Raise ``ValueError`` if ``x`` breaks MedNet's input contract (``docs/architecture.md``).

    Args:
        x: the input, expected ``(B, in_chans, H, W)`` with ``H, W >= min_input_size``, finite.

    Shape checks are static; the finiteness check is skipped while tracing/exporting.
    """
    if x.ndim != 4:
        raise ValueError(f"MedNet expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        hint = (
            "repeat the gray channel (x.expand(-1, 3, -1, -1)) or create the model with in_chans=1"
            if x.shape[1] == 1
            else "convert to gray or create the model with in_chans=%d" % x.shape[1]
        )
        raise ValueError(
            f"MedNet built for {in_chans} input channel(s) got {x.shape[1]} "
            f"(shape {tuple(x.shape)}): {hint}"
        )
    h, w = x.shape[-2:]
    if h < min_input_size or w < min_input_size:
        raise ValueError(
            f"input {h}x{w} is smaller than MedNet's minimum {min_input_size}x{min_input_size}: "
            f"resize it first (openmednet.data.build_transform does this)"
        )
    if not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()):
        if not torch.isfinite(x).all():
            raise ValueError("input contains NaN or infinite values: check the image decoding/normalisation")


def run_blocks(
    stem: nn.Module,
    blocks: Sequence[MultiBranchBlock],
    connections: Mapping[str, nn.Module],
    incoming: Sequence[Sequence[str]],
    x: Tensor,
    num_blocks: int | None = None,
) -> Iterator[Tensor]:
    """Run MedNet's trunk on ``x``, yielding the stem output and then each block's output.

    The one place the connection wiring is executed (``MedNet`` and ``MedNetFeatures`` share it):
    block ``b`` gets the previous output plus, through ``connections[key]``, the outputs named by
    ``incoming[b - 1]`` (keys ``"c<src>_<dst>"``, source 0 = stem).

    Args:
        num_blocks: stop after this many blocks (default: all of ``blocks``).
    """
    num_blocks = len(blocks) if num_blocks is None else num_blocks
    outs = [stem(x)]
    yield outs[0]
    for block, keys in zip(list(blocks)[:num_blocks], incoming):
        conns = [connections[k](outs[MedNet.connections_spec_src(k)]) for k in keys]
        outs.append(block(outs[-1], conns))
        yield outs[-1]


def take_indices(num_features: int, indices: int | Sequence[int] | None) -> list[int]:
    """Absolute, increasing feature indices, as timm's ``feature_take_indices`` resolves them.

    ``None`` = all, an int ``n`` = the last ``n``, a sequence = those (negative from the end).

    Raises:
        ValueError: an index out of range, a repeated index, or an order other than increasing.
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n indices must be 1..{num_features}, got {indices}")
        return list(range(num_features - indices, num_features))
    take = [i + num_features if i < 0 else i for i in indices]
    if not take or any(not 0 <= i < num_features for i in take):
        raise ValueError(f"feature indices must be in -{num_features}..{num_features - 1}, got {tuple(indices)}")
    if any(b <= a for a, b in zip(take, take[1:])):
        raise ValueError(f"feature indices must be increasing and distinct (shallow to deep), got {tuple(indices)}")
    return take


# --------------------------------------------------------------------------------- registry
def _gray_cfg(**kw: Any) -> PretrainedCfg:
    return PretrainedCfg(input_size=(1, 64, 64), mean=(0.5,), std=(0.25,), **kw)


def _color_cfg(**kw: Any) -> PretrainedCfg:
    return PretrainedCfg(input_size=(3, 64, 64), min_input_size=(3, MIN_INPUT_SIZE, MIN_INPUT_SIZE), mean=(0.5, 0.5, 0.5),
                         std=(0.25, 0.25, 0.25), **kw)


def _create_mednet(variant: str, default_cfg: PretrainedCfg, **kwargs: Any) -> MedNet:
    model = MedNet(**kwargs)
    model.pretrained_cfg = default_cfg.replace(
        input_size=(model.in_chans, *default_cfg.input_size[1:]),
        min_input_size=(model.in_chans, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        mean=default_cfg.mean[:1] * model.in_chans if len(default_cfg.mean) != model.in_chans else default_cfg.mean,
        std=default_cfg.std[:1] * model.in_chans if len(default_cfg.std) != model.in_chans else default_cfg.std,
        meta={**default_cfg.meta, "architecture": variant},
    )
    return model


def variant_cfg(variant: str) -> PretrainedCfg:
    """The ``pretrained_cfg`` a variant's entrypoint sets at its default channels, without building it.

    For registries that need the input contract cheaply (timm's, in ``_timm.py``); equal to
    ``create_model(variant).pretrained_cfg`` (tested).
    """
    cfg = {"mednet_gray": _gray_cfg, "mednet_color": _color_cfg, "mednet_test": _gray_cfg}[variant]()
    chans = cfg.input_size[0]
    return cfg.replace(
        min_input_size=(chans, MIN_INPUT_SIZE, MIN_INPUT_SIZE), meta={**cfg.meta, "architecture": variant}
    )


@register_model
def mednet_gray(**kwargs: Any) -> MedNet:
    """Gray-MedNet: 1 input channel (X-ray, CT, MRI, ultrasound, mammography)."""
    return _create_mednet("mednet_gray", _gray_cfg(), **{"in_chans": 1, **kwargs})


@register_model
def mednet_color(**kwargs: Any) -> MedNet:
    """Color-MedNet: 3 input channels (histology, dermoscopy, blood smears, fundus)."""
    return _create_mednet("mednet_color", _color_cfg(), **{"in_chans": 3, **kwargs})


@register_model
def mednet_test(**kwargs: Any) -> MedNet:
    """Tiny MedNet (``width_mult=0.25``) for fast tests; same topology (44 convs, 12 connections)."""
    return _create_mednet("mednet_test", _gray_cfg(), **{"in_chans": 1, "width_mult": 0.25, **kwargs})


# Weight sets are registered by openmednet.models._shipped (generated when weights are released).
register_pretrained_cfgs("mednet_gray", {})
register_pretrained_cfgs("mednet_color", {})

"""Building blocks of MedNet: conv-BN-ReLU, the four-branch block, inter-block connections, head.

Shapes are written ``(B, C, H, W)``. All convolutions are bias-free because a BatchNorm follows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _fold_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """``conv`` with the eval-mode BatchNorm ``bn`` folded into its weight and bias.

    ``BN(conv(x)) = gamma * (W*x - mu) / sqrt(var + eps) + beta`` is itself a convolution, so at
    inference the BN pass over the feature map can be skipped (the classic conv-BN fusion).

    Raises:
        ValueError: ``conv`` or ``bn`` is in training mode (batch statistics cannot be folded).
    """
    if conv.training or bn.training:
        raise ValueError("BatchNorm folding needs eval mode (batch statistics change per batch): call .eval() first")
    return fuse_conv_bn_eval(conv, bn)


class ConvBnAct(nn.Sequential):
    """``Conv2d(k, stride, padding=k//2, bias=False) -> BatchNorm2d -> ReLU``.

    Output spatial size is ``ceil(H / stride)`` for odd ``k`` (the "same" padding of the paper).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, act: bool = True):
        layers: dict[str, nn.Module] = {
            "conv": nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False),
            "bn": nn.BatchNorm2d(out_chs),
        }
        if act:
            layers["act"] = nn.ReLU(inplace=True)
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)

    def fold_bn_(self) -> None:
        """Fold the BatchNorm into the conv in place (eval only; see ``MedNet.fuse_for_inference``).

        The ``bn`` slot becomes ``nn.Identity`` and ``conv`` gains a bias, so the module computes
        the same function with one pass fewer over its output.
        """
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = _fold_bn(self.conv, self.bn)
            self.bn = nn.Identity()


class MultiBranchBlock(nn.Module):
    """The MedNet block: four parallel conv-BN-ReLU branches with kernels 1, 3, 5 and 7.

    The branch outputs are concatenated together with the block's incoming connections and the
    result is batch-normalised (as in the authors' predecessor model). A down-sampling block uses
    ``stride=2`` in all four branches.

    ``merge_groups`` (default ``()``: every branch separate; set it through
    ``MedNet.set_branch_merge``) runs each group of branches, named by kernel size, as one conv,
    e.g. ``((1, 3), (5, 7))``: the same network computed another way, see ``merged_branches``.
    It is a plain attribute, so the ``state_dict`` does not change.

    Args:
        in_chs: channels of the main input.
        width: total channels of the four branches (``width // 4`` each).
        stride: 1, or 2 for a down-sampling block.
        connection_chs: channels of each incoming connection, in the order passed to ``forward``.

    Shapes:
        ``x``: ``(B, in_chs, H, W)``; each connection: ``(B, c_i, ceil(H/stride), ceil(W/stride))``;
        output: ``(B, width + sum(c_i), ceil(H/stride), ceil(W/stride))``.
    """

    kernel_sizes = (1, 3, 5, 7)

    def __init__(self, in_chs: int, width: int, stride: int = 1, connection_chs: tuple[int, ...] = ()):
        super().__init__()
        if width % len(self.kernel_sizes):
            raise ValueError(f"block width must be a multiple of 4, got {width}")
        branch_chs = width // len(self.kernel_sizes)
        self.branches = nn.ModuleList(
            ConvBnAct(in_chs, branch_chs, k, stride) for k in self.kernel_sizes
        )
        self.connection_chs = tuple(connection_chs)
        self.out_chs = width + sum(self.connection_chs)
        self.bn = nn.BatchNorm2d(self.out_chs)
        self.merge_groups: tuple[tuple[int, ...], ...] = ()

    @property
    def merge_branches(self) -> bool:
        """Whether any branches run merged; setting ``True`` merges all four, ``False`` none."""
        return bool(self.merge_groups)

    @merge_branches.setter
    def merge_branches(self, value: bool) -> None:
        self.merge_groups = (self.kernel_sizes,) if value else ()

    def merged_branches(self, x: Tensor, groups: Sequence[Sequence[int]] | None = None) -> Tensor:
        """The four branches' concatenated outputs, each group of branches computed with one conv.

        A group's conv weight is built from its branch weights at every call (each kernel
        zero-padded, centred, to the group's largest), so gradients reach the branch parameters
        and nothing new is stored. One ``batch_norm`` call per group then normalises its channels
        with the branch BNs' parameters and statistics (``branch_batch_norm``), and the ReLU
        follows. A one-branch group runs that branch as it is. Wider convs run closer to the
        kernels' peak on narrow branches (8 channels each in stage 1 at width 1), at the cost of
        the padded FLOPs: 2.33x the branch FLOPs for ``((1, 3, 5, 7),)``
        (``4 * 49 / (1 + 9 + 25 + 49)``), 1.38x for ``((1, 3), (5, 7))``; ``docs/benchmarks.md``
        says where each pays.

        Args:
            x: ``(B, in_chs, H, W)``.
            groups: kernel sizes per group, covering ``(1, 3, 5, 7)`` in order (default: this
                block's ``merge_groups``, or all four in one group when that is empty).

        Returns:
            ``(B, width, ceil(H/stride), ceil(W/stride))``, equal to
            ``torch.cat([branch(x) for branch in self.branches], 1)`` up to float rounding.

        Raises:
            ValueError: the groups do not split ``(1, 3, 5, 7)`` in order, a branch BatchNorm was
                folded (``fuse_for_inference`` copies run the branches separately) or the branch
                BNs' settings differ.
        """
        outputs = self._group_outputs(x, groups or self.merge_groups or (self.kernel_sizes,))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)

    def _group_outputs(self, x: Tensor, groups: Sequence[Sequence[int]]) -> list[Tensor]:
        """Each group's ``(B, group channels, H', W')`` output, in branch order (``merged_branches``)."""
        groups = check_branch_groups(groups, self.kernel_sizes)
        outputs, first = [], 0
        for group in groups:
            branches = self.branches[first:first + len(group)]
            first += len(group)
            if len(branches) == 1:
                outputs.append(branches[0](x))
                continue
            convs = [branch.conv for branch in branches]
            bns = [branch.bn for branch in branches]
            if not all(isinstance(bn, nn.BatchNorm2d) for bn in bns):
                raise ValueError("merged branches need the branch BatchNorms: this block's were folded "
                                 "(fuse_for_inference); set merge_branches = False on the folded copy")
            y = F.conv2d(x, merged_branch_weight(convs), None, convs[0].stride, max(group) // 2)
            outputs.append(F.relu(branch_batch_norm(y, bns), inplace=True))
        return outputs

    def forward(self, x: Tensor, connections: list[Tensor] | tuple[Tensor, ...] = ()) -> Tensor:
        """Run the branches on ``x`` and join them with ``connections`` (see class docstring)."""
        if self.merge_groups:
            branches = self._group_outputs(x, self.merge_groups)
        else:
            branches = [branch(x) for branch in self.branches]
        return self.bn(torch.cat(branches + list(connections), dim=1))


def check_branch_groups(groups: Sequence[Sequence[int]], kernel_sizes: Sequence[int] = (1, 3, 5, 7)) -> tuple[tuple[int, ...], ...]:
    """``groups`` as a tuple of tuples, checked to split ``kernel_sizes`` into runs in order.

    The order matters: the block concatenates the groups' outputs, and the channels must come
    out as the separate branches' do (``1x1, 3x3, 5x5, 7x7``).

    Raises:
        ValueError: e.g. ``((1, 5), (3, 7))`` or a missing kernel size.
    """
    try:
        groups = tuple(tuple(int(k) for k in group) for group in groups)
    except TypeError:
        raise ValueError(f"branch groups are sequences of kernel sizes, e.g. ((1, 3), (5, 7)); got {groups!r}") from None
    if not groups or any(not group for group in groups) or sum(groups, ()) != tuple(kernel_sizes):
        raise ValueError(f"branch groups must split the kernel sizes {tuple(kernel_sizes)} into runs in order, "
                         f"e.g. ((1, 3), (5, 7)) or ({tuple(kernel_sizes)},); got {groups}")
    return groups


def merged_branch_weight(convs: Sequence[nn.Conv2d]) -> Tensor:
    """One conv weight from bias-free branch convs with odd kernels: ``(sum C_out, C_in, K, K)``.

    Each kernel is zero-padded (centred) to the largest ``K`` and the kernels are concatenated on
    the output axis. With padding ``K // 2`` and the branches' common stride, the merged conv
    computes every branch at once: a centred ``k x k`` kernel with padding ``k // 2`` sees the
    same input pixels as its zero-padded ``K x K`` copy with padding ``K // 2``.
    """
    size = max(c.kernel_size[0] for c in convs)
    return torch.cat([F.pad(c.weight, [(size - c.kernel_size[0]) // 2] * 4) for c in convs])


def branch_batch_norm(y: Tensor, bns: Sequence[nn.BatchNorm2d]) -> Tensor:
    """``torch.cat([bn(part) for bn, part in zip(bns, y.split(...))], 1)`` in one ``batch_norm`` call.

    Batch normalisation is per channel, so one call over the concatenated channels, given the
    concatenated affine terms and running statistics, computes what the separate BNs compute. In
    training mode the updated running statistics are copied back into each BN and every
    ``num_batches_tracked`` counts the batch, as ``nn.BatchNorm2d.forward`` does (including
    ``momentum=None``, the cumulative average). Source: ``torch.nn.modules.batchnorm._BatchNorm``.

    Args:
        y: ``(B, sum(bn.num_features), H, W)``, channels in the order of ``bns``.
        bns: the branch BNs; they must agree on mode, eps, momentum, affine, running statistics
            and (for ``momentum=None``) ``num_batches_tracked``.

    Raises:
        ValueError: the BNs' settings differ (one call cannot apply two of them).
    """
    first = bns[0]
    settings = lambda bn: (bn.training, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if any(settings(bn) != settings(first) for bn in bns[1:]):
        raise ValueError(
            "merged branches run one batch_norm, so the branch BatchNorms must share mode, eps, momentum, "
            f"affine and track_running_stats; got {[settings(bn) for bn in bns]}: set merge_branches = False "
            f"to run them separately"
        )
    tracking = first.training and first.track_running_stats
    factor = 0.0 if first.momentum is None else first.momentum
    if tracking:
        if first.momentum is None and any(not torch.equal(bn.num_batches_tracked, first.num_batches_tracked) for bn in bns):
            raise ValueError("momentum=None averages over num_batches_tracked, which differs between the branch "
                             "BatchNorms: set merge_branches = False to run them separately")
        for bn in bns:
            bn.num_batches_tracked.add_(1)
        if first.momentum is None:  # cumulative moving average
            factor = 1.0 / float(first.num_batches_tracked)
    # As _BatchNorm: batch statistics in training, or always when no running statistics are kept.
    use_batch_stats = first.training or first.running_mean is None
    has_stats = first.running_mean is not None and (not first.training or first.track_running_stats)
    mean = torch.cat([bn.running_mean for bn in bns]) if has_stats else None
    var = torch.cat([bn.running_var for bn in bns]) if has_stats else None
    weight = torch.cat([bn.weight for bn in bns]) if first.affine else None
    bias = torch.cat([bn.bias for bn in bns]) if first.affine else None
    out = F.batch_norm(y, mean, var, weight, bias, use_batch_stats, factor, first.eps)
    if tracking:  # batch_norm updated the concatenated copies in place: hand each BN its part
        sizes = [bn.num_features for bn in bns]
        with torch.no_grad():
            for bn, m, v in zip(bns, mean.split(sizes), var.split(sizes)):
                bn.running_mean.copy_(m)
                bn.running_var.copy_(v)
    return out


class SkipConnector(nn.Module):
    """An inter-block connection: identity, or one 1x1 convolution (after average pooling when the
    destination is at a lower resolution) followed by BatchNorm.

    Average pooling before the 1x1 (rather than a strided 1x1) keeps every input pixel's
    contribution, as in ResNet-D. ``ceil_mode`` matches the ``ceil(H/stride)`` of the blocks.

    Args:
        in_chs: channels at the source.
        out_chs: channels delivered to the destination (ignored for identity).
        stride: resolution ratio source/destination (1, 2, 4, 8...).
        identity: pass the source through unchanged (requires ``stride == 1``).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, identity: bool = False):
        super().__init__()
        self.identity = identity
        self.stride = stride
        if identity:
            if stride != 1:
                raise ValueError("an identity connection cannot change resolution")
            self.out_chs = in_chs
            self.pool = self.conv = self.bn = None
        else:
            self.out_chs = out_chs
            self.pool = (
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else None
            )
            self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
            self.bn = nn.BatchNorm2d(out_chs)

    def fold_bn_(self) -> None:
        """Fold the BatchNorm into the 1x1 conv in place (eval only); identity links are unchanged.

        Average pooling before the conv is linear, so folding after it stays exact.
        """
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = _fold_bn(self.conv, self.bn)
            self.bn = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_chs, H, W) -> (B, out_chs, ceil(H/stride), ceil(W/stride))``."""
        if self.identity:
            return x
        if self.pool is not None:
            x = self.pool(x)
        return self.bn(self.conv(x))


class ClassifierHead(nn.Module):
    """Global average pooling, then ``FC(hidden) -> ReLU -> Dropout -> FC(num_classes)``.

    The paper specifies two fully connected layers with one dropout between them; the predecessor
    used 200 hidden units and dropout 0.5. ``num_classes=0`` makes the head return pooled features.
    Softmax is not applied here: losses take logits, and ``predict`` applies softmax.
    """

    def __init__(self, in_features: int, num_classes: int, hidden_size: int = 200, drop_rate: float = 0.5):
        super().__init__()
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.drop_rate = drop_rate
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        """Re-create both FC layers for ``num_classes`` outputs (0 = features only)."""
        self.num_classes = num_classes
        if num_classes > 0:
            self.fc1 = nn.Linear(self.in_features, self.hidden_size)
            self.act = nn.ReLU(inplace=True)
            self.drop = nn.Dropout(self.drop_rate)
            self.fc = nn.Linear(self.hidden_size, num_classes)
        else:
            self.fc1 = self.act = self.drop = self.fc = nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``(B, C, H, W) -> (B, num_classes)``, or ``(B, C)`` pooled features if ``pre_logits``."""
        x = self.flatten(self.pool(x))
        if pre_logits:
            return x
        return self.fc(self.drop(self.act(self.fc1(x))))

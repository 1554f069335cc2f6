"""EfficientNet-Lite (Tan & Le 2019, TF 'lite' variants) with the lukemelas EfficientNet-PyTorch key layout.

Lite models drop squeeze-excitation, use ReLU6, and keep the stem (32) and head (1280) widths fixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, output channels) of EfficientNet-B0's seven stages.
BASE_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# name -> (width multiplier, depth multiplier)
VARIANTS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2), "lite3": (1.2, 1.4), "lite4": (1.4, 1.8)}
BN_EPS = 1e-3


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by the width multiplier, rounded to a multiple of 8 (never down >10%)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for even inputs), as the weights were trained."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.stride == (1, 1):  # odd kernels at stride 1: SAME is symmetric, let the conv pad
            self.padding = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        # An odd SAME padding puts one more zero after the input than before it. Instead of padding
        # the (large) input, pad both sides by the larger amount and prepend a zero tap to the
        # (small) kernel: every window then covers exactly the same pixels with the same weights.
        padding, kernel_pad = [], [0, 0, 0, 0]
        for axis, (size, k, s) in enumerate(zip(x.shape[-2:], self.weight.shape[-2:], self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            padding.append((total + 1) // 2)
            kernel_pad[2 - 2 * axis] = total % 2
        if torch.onnx.is_in_onnx_export():  # exporters need a constant kernel shape: pad the input instead
            before = [p - kernel_pad[2 - 2 * axis] for axis, p in enumerate(padding)]
            x = F.pad(x, (before[1], padding[1], before[0], padding[0]))
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        weight = F.pad(self.weight, kernel_pad) if any(kernel_pad) else self.weight
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


def relu6_(x: torch.Tensor) -> torch.Tensor:
    """In-place ReLU6 (saves a copy per activation)."""
    return F.hardtanh(x, 0.0, 6.0, inplace=True)


def fold_batchnorm(module: nn.Module) -> None:
    """Fold every conv's following BatchNorm into the conv (inference only), in place."""
    pairs = {"_conv_stem": "_bn0", "_expand_conv": "_bn0", "_depthwise_conv": "_bn1", "_project_conv": "_bn2", "_conv_head": "_bn1"}
    for sub in module.modules():
        for conv_name, bn_name in pairs.items():
            conv, bn = getattr(sub, conv_name, None), getattr(sub, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                setattr(sub, conv_name, fused)
                setattr(sub, bn_name, nn.Identity())


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = relu6_(self._bn0(self._expand_conv(x))) if self.expand else x
        y = relu6_(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """The classification network; `stage_ends` gives the block index closing each stride."""

    def __init__(self, variant: str, num_classes: int = 1000) -> None:
        super().__init__()
        width, depth = VARIANTS[variant]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[MBConv] = []
        in_ch, stride_total = 32, 2
        self.stage_ends: dict[int, int] = {}
        self.stage_channels: dict[int, int] = {}
        for index, (repeats, kernel, stride, expand, out) in enumerate(BASE_STAGES):
            out_ch = round_filters(out, width)
            count = repeats if index in (0, len(BASE_STAGES) - 1) else math.ceil(repeats * depth)
            for i in range(count):
                blocks.append(MBConv(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
            stride_total *= stride
            self.stage_ends[stride_total] = len(blocks) - 1
            self.stage_channels[stride_total] = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_ch, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor, strides: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Feature maps at the given strides (4, 8, 16, 32), stopping after the deepest one needed."""
        wanted = {self.stage_ends[s]: s for s in strides}
        last = max(wanted)
        out: dict[int, torch.Tensor] = {}
        x = relu6_(self._bn0(self._conv_stem(x)))
        for index, block in enumerate(self._blocks[: last + 1]):
            x = block(x)
            if index in wanted:
                out[wanted[index]] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x, (32,))[32]
        x = relu6_(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

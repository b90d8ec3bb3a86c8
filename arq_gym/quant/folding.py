"""Block folding for the int8 backend: a CIFAR ResNet basic block whose two convolutions are
both int8 runs the first one's batch norm, ReLU and the second one's activation quantizer
inside the first integer convolution (:class:`FoldedInt8Block`)."""

from __future__ import annotations

import torch
from torch import nn

from arq_gym.models.architectures import PadShortcut
from arq_gym.quant.int8 import _int8_conv_folded_op, _int8_conv_op

__all__ = ["FoldedInt8Block"]


class FoldedInt8Block(nn.Module):
    """A CIFAR ResNet :class:`~arq_gym.models.architectures.BasicBlock` whose two convolutions
    both run in int8: the first writes the second's uint8 codes directly
    (:meth:`Int8Conv2d.fold`), so its float output never goes to memory. Installed by the int8
    backend in place of the block; ``block`` is the original (its convs are the int8 layers)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        codes = _int8_conv_folded_op(b.conv1.codes(x), b.conv1.key_t, b.conv1.geometry)
        # The float work after the second convolution runs on NHWC views of the channels_last
        # tensors: a compiled graph then lays its buffers out like the convolutions (its
        # default layout is contiguous in the logical order), where NCHW views made it
        # transpose tiles in every block after the first option-A shortcut.
        out = _int8_conv_op(codes, b.conv2.key_t, b.conv2.geometry).permute(0, 2, 3, 1)
        bn = b.bn2  # eval-mode batch norm, written out on the last (channel) dimension
        out = (out - bn.running_mean) * torch.rsqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        shortcut = x.permute(0, 2, 3, 1)  # BasicBlock's shortcut: identity or option A
        if isinstance(b.shortcut, PadShortcut):
            half = b.shortcut.extra // 2
            shortcut = nn.functional.pad(shortcut[:, ::2, ::2, :], (half, b.shortcut.extra - half))
        return nn.functional.relu(out + shortcut).permute(0, 3, 1, 2)

"""Convolutions with prepacked weights for CPU inference in bfloat16 and float16.

oneDNN, PyTorch's CPU convolution library, computes in a blocked weight layout of its own. `F.conv2d` reorders the
weight into it at every call: a pass over the whole weight, which costs as much as the convolution itself where
the feature map is small (SD 1.5's deepest levels are 4×4 and 2×2 for a 128×128 image: a bf16 3×3 convolution
of 1280 channels on 8 such maps takes 7.2 ms through `F.conv2d` and 3.6 ms prepacked, on a 2-core Xeon with AMX).
`PrepackedConv2d` reorders once and keeps the result; the values are the same bit for bit (tested). This is what
`torch.compile`'s CPU backend does with frozen weights, here without compiling.
"""
from __future__ import annotations

import torch
from torch import nn


class PrepackedConv2d(nn.Conv2d):
    """An `nn.Conv2d` (the same parameters and state-dict keys) that, at inference on the CPU, convolves with a
    copy of its weight in oneDNN's layout, made at the first call and again whenever the weight changes (another
    tensor, dtype, or an in-place update). Training, other devices and other padding modes take `nn.Conv2d`'s path.
    """

    @classmethod
    def of(cls, conv: nn.Conv2d) -> PrepackedConv2d:
        """A PrepackedConv2d that shares `conv`'s weight and bias."""
        packed = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        packed.weight, packed.bias = conv.weight, conv.bias
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or self.padding_mode != "zeros" \
                or isinstance(self.padding, str):
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight(x), self.bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups, "none", [], "")

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in oneDNN's layout (chosen for x's shape; it serves any other shape too), cached."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype)
        if getattr(self, "_packed_key", None) != key:
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
            self._packed_key = key
        return self._packed


def prepack_convolutions(module: nn.Module) -> nn.Module:
    """`module` with every `nn.Conv2d` inside it replaced, in place, by a `PrepackedConv2d` sharing its parameters."""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            setattr(module, name, PrepackedConv2d.of(child))
        else:
            prepack_convolutions(child)
    return module

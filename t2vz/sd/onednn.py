"""Convolutions with prepacked weights for CPU inference in bfloat16 and float16.

oneDNN, PyTorch's CPU convolution library, computes in a blocked weight layout of its own. `F.conv2d` reorders the
weight into it at every call: a pass over the whole weight, which costs as much as the convolution itself where
the feature map is small (SD 1.5's deepest levels are 4×4 and 2×2 for a 128×128 image: a bf16 3×3 convolution
of 1280 channels on 8 such maps takes 7.2 ms through `F.conv2d` and 3.6 ms prepacked, on a 2-core Xeon with AMX).
`PrepackedConv2d` reorders once and keeps the result; the values are the same bit for bit (tested). This is what
`torch.compile`'s CPU backend does with frozen weights, here without compiling.

oneDNN's reduced-precision weight reorder exists only on CPUs that compute in that precision: bfloat16 needs
AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, float16 AVX-512 FP16 or AVX-NE-CONVERT. Elsewhere the reorder raises, so
`onednn_supports` asks PyTorch first (it also honours `ONEDNN_MAX_CPU_ISA`, the variable oneDNN reads to behave as
an older CPU), and where the answer is no the convolutions stay plain `nn.Conv2d`s (`prepack_convolutions` leaves
them, `PrepackedConv2d.forward` falls back). `reduced_precision_note` is the one line a user then sees.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)

# PyTorch's own question for each reduced precision: does oneDNN compute it on this CPU (natively or with
# AVX-512 conversions), as opposed to refusing or leaving it to ATen's reference kernels
_SUPPORT_CHECKS = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
_NEEDS = {torch.bfloat16: "AVX-512 BW/VL/DQ or AVX-NE-CONVERT", torch.float16: "AVX-512 FP16 or AVX-NE-CONVERT"}
_NATIVE = {torch.bfloat16: "AVX-512 BF16 or AMX", torch.float16: "AMX-FP16"}


@functools.cache
def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN computes convolutions in `dtype` on the running CPU (float32: wherever oneDNN is built in).
    The checks are private PyTorch ops: where one is missing or fails, the answer is no (the plain path)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype not in _SUPPORT_CHECKS:
        return dtype == torch.float32
    try:
        return bool(getattr(torch.ops.mkldnn, _SUPPORT_CHECKS[dtype])())
    except (AttributeError, RuntimeError):
        return False


# oneDNN's instruction sets in order (ONEDNN_MAX_CPU_ISA caps it at one of them; synonyms share a rank)
_ISA_RANK = {name: rank for rank, names in enumerate([
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16",
    "AVX512_CORE_FP16 AVX10_1_512", "AVX512_CORE_AMX AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16 AVX10_1_512_AMX_FP16",
    "ALL"]) for name in names.split()}


def _isa_allows(level: str) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA), where set to a name oneDNN knows, lets oneDNN
    use the instructions of `level`."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return _ISA_RANK.get(cap, _ISA_RANK["ALL"]) >= _ISA_RANK[level]


def _cpu_has(check: str) -> bool:
    """torch.cpu's private CPUID check `check` (False where missing)."""
    try:
        return bool(getattr(torch.cpu, check)())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def native_arithmetic(dtype: torch.dtype) -> bool:
    """Whether the CPU has the instructions that make `dtype` faster than float32 in oneDNN: bfloat16 AVX-512 BF16
    or AMX, float16 AMX-FP16, within oneDNN's ISA cap. Without them the dtype was no faster than float32 on the
    SD 1.5 UNet (2-core Xeon, one forward at a 16×16 latent, batch 8: fp32 1.93 s, fp16 with AVX-512 FP16 but no
    AMX-FP16 1.96 s, bf16 with AMX 0.48 s, bf16 capped at AVX-512 VNNI 5.38 s; docs/performance.md)."""
    if dtype == torch.bfloat16:
        return (_cpu_has("_is_avx512_bf16_supported") and _isa_allows("AVX512_CORE_BF16")) or \
            (_cpu_has("_is_amx_tile_supported") and _isa_allows("AVX512_CORE_AMX"))
    if dtype == torch.float16:
        return _cpu_has("_is_amx_fp16_supported") and _isa_allows("AVX512_CORE_AMX_FP16")
    return True


def reduced_precision_note(dtype: torch.dtype) -> str | None:
    """One line for a CPU on which `dtype` (bfloat16 or float16) is slow, naming the faster choice; None where it
    is fast, and for float32. Slow: oneDNN has no kernels for it, so PyTorch runs its reference kernels (4 to 180
    times slower than float32 per convolution or matmul at SD 1.5's sizes, measured capped at AVX2), or oneDNN has them but the CPU lacks the instructions
    that make them fast (`native_arithmetic`; docs/performance.md, "bf16 on the CPU")."""
    if dtype not in _SUPPORT_CHECKS or (onednn_supports(dtype) and native_arithmetic(dtype)):
        return None
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    bf16_fast = onednn_supports(torch.bfloat16) and native_arithmetic(torch.bfloat16)
    faster = "dtype=bf16 or dtype=fp32 is" if dtype == torch.float16 and bf16_fast else "dtype=fp32 is"
    if not onednn_supports(dtype):
        return (f"dtype={name}: this CPU's oneDNN has no {name} kernels (they need {_NEEDS[dtype]}; PyTorch runs at "
                f"{torch.backends.cpu.get_cpu_capability()} here), so {name} runs in PyTorch's slow reference "
                f"kernels; {faster} faster on this CPU")
    advice = "dtype=bf16 is faster" if dtype == torch.float16 and bf16_fast else "dtype=fp32 is as fast or faster"
    return (f"dtype={name}: this CPU has no {_NATIVE[dtype]}, without which {name} is no faster than fp32 "
            f"(docs/performance.md, bf16 on the CPU); {advice} on this CPU")


@functools.cache
def note_reduced_precision(dtype: torch.dtype) -> None:
    """Log `reduced_precision_note(dtype)` as a warning, once per process and dtype."""
    note = reduced_precision_note(dtype)
    if note:
        log.warning(note)


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
                or isinstance(self.padding, str) or not onednn_supports(self.weight.dtype):
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
    """`module` with every `nn.Conv2d` inside it replaced, in place, by a `PrepackedConv2d` sharing its parameters.
    (`PrepackedConv2d` takes the plain path for a dtype the CPU's oneDNN does not support; `prepare_for_device`
    does not call this there.)"""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            setattr(module, name, PrepackedConv2d.of(child))
        else:
            prepack_convolutions(child)
    return module

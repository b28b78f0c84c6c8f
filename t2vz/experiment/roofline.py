"""How close a module's forward comes to the hardware: its convolutions, matmuls and attention kernels are recorded
during one forward, then each is timed alone at the same shapes, strides and dtype, and the sum of those times is
set against the forward's own time. Their ratio is the fraction of its own kernels' throughput that the forward
reaches; the rest of the forward's time goes to everything else (norms, activations, additions, layout changes,
dtype conversions, Python). Used by experiments/roofline.py; implementation-agnostic (any module, any callable).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .benchmark import count_flops

# the compute kernels: what FlopCounterMode counts (convolutions, matmuls, attention), by their aten names
KERNEL_KINDS = {
    "convolution": "convolution", "_convolution_pointwise": "convolution",  # the latter: prepacked (sd/onednn.py)
    "addmm": "matmul", "mm": "matmul", "bmm": "matmul", "baddbmm": "matmul",
    "_scaled_dot_product_flash_attention_for_cpu": "attention",
    "_scaled_dot_product_flash_attention": "attention",
    "_scaled_dot_product_efficient_attention": "attention",
    "_scaled_dot_product_cudnn_attention": "attention",
}


@dataclass
class KernelCall:
    """One recorded kernel call: the op, its arguments with every tensor replaced by (shape, stride, dtype)."""

    op: torch._ops.OpOverload
    args: tuple
    kwargs: dict

    @property
    def kind(self) -> str:
        return KERNEL_KINDS[self.op._overloadpacket.__name__]

    def key(self) -> str:
        return f"{self.op}{self.args}{sorted(self.kwargs.items())}"


def _describe(value):
    if isinstance(value, torch.Tensor) and value.layout == torch._mkldnn:
        return ("kept", value)  # a prepacked weight: opaque layout, reused as it is
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return type(value)(_describe(v) for v in value)
    return value


def _materialize(value, generator: torch.Generator):
    """A described argument back as a tensor of the same shape, strides, dtype and device, filled with N(0, 1)."""
    if isinstance(value, tuple) and value[:1] == ("kept",):
        return value[1]
    if isinstance(value, tuple) and value[:1] == ("tensor",):
        _, shape, stride, dtype, device = value
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float32).to(dtype))
        return t
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v, generator) for v in value)
    return value


class KernelRecorder(TorchDispatchMode):
    """`with KernelRecorder() as rec: module(x)`: rec.calls lists every compute kernel (KERNEL_KINDS) called."""

    def __init__(self):
        super().__init__()
        self.calls: list[KernelCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._overloadpacket.__name__ in KERNEL_KINDS:
            self.calls.append(KernelCall(func, _describe(args), _describe(kwargs)))
        return func(*args, **kwargs)


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of `fn()` over `repeats` calls after one untimed call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_kernels_alone(calls: list[KernelCall], repeats: int = 5, sync: Callable[[], None] = lambda: None
                       ) -> list[float]:
    """Each call's median time when run alone on fresh inputs of its shapes (identical calls timed once)."""
    generator = torch.Generator().manual_seed(0)
    timed: dict[str, float] = {}
    for call in calls:
        if call.key() not in timed:
            args, kwargs = _materialize(call.args, generator), _materialize(call.kwargs, generator)
            with torch.no_grad():
                timed[call.key()] = median_seconds(lambda: call.op(*args, **kwargs), repeats, sync)
    return [timed[call.key()] for call in calls]


def roofline(forward: Callable[[], object], repeats: int = 5, sync: Callable[[], None] = lambda: None) -> dict:
    """Time `forward()` (median of `repeats`), record its kernels, time each alone, count its FLOPs. Returns the
    forward's seconds, the kernels' summed seconds alone (all and per kind, with call counts), the FLOPs, and
    `kernel_fraction` = kernels alone / forward: the fraction of its own kernels' throughput the forward reaches."""
    with torch.no_grad():
        forward_s = median_seconds(forward, repeats, sync)
        with KernelRecorder() as recorder:
            forward()
        _, flops = count_flops(forward)
    alone = time_kernels_alone(recorder.calls, repeats, sync)
    kinds: dict[str, dict] = {}
    for call, seconds in zip(recorder.calls, alone):
        entry = kinds.setdefault(call.kind, {"calls": 0, "seconds": 0.0})
        entry["calls"] += 1
        entry["seconds"] += seconds
    kernels_s = sum(alone)
    return {"forward_s": forward_s, "kernels_s": kernels_s, "kernel_fraction": kernels_s / forward_s,
            "flops": flops, "kinds": kinds}


def matmul_peak_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device="cpu",
                      sync: Callable[[], None] = lambda: None) -> float:
    """The machine's measured matmul throughput (FLOP/s): an n×n by n×n product in `dtype`, median of `repeats`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats, sync)

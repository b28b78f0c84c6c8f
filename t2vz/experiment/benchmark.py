"""Measurement helpers for experiments/benchmark.py: denoising steps, UNet calls, peak memory, FLOPs, the device's
peak FLOP/s, machine info with the CPU features that reduced precision depends on, and the SDPA backend forced on
one module. Implementation-agnostic (they measure any nn.Module / callable); no diffusers here.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import resource
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# Peak dense (no sparsity) FLOP/s from NVIDIA's datasheets, in TFLOP/s: fp16/bf16 on tensor cores, fp32 without
# tensor cores (TF32 tensor-core peaks are higher; cuDNN convolutions may use TF32 in fp32 unless disabled).
# Matched against torch.cuda.get_device_name() in order: the first key contained in the name wins.
PEAK_TFLOPS = {
    "H200 NVL": {"fp16": 835.0, "bf16": 835.0, "fp32": 60.0},
    "H200": {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9},  # H200 SXM: H100 SXM's compute
    "H100 NVL": {"fp16": 835.0, "bf16": 835.0, "fp32": 60.0},
    "H100 PCIe": {"fp16": 756.5, "bf16": 756.5, "fp32": 51.2},
    "H100": {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9},  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
}


def denoising_steps(num_inference_steps: int, t0: int, t1: int) -> dict[str, int]:
    """DDIM steps (= UNet calls, each batching the unconditional and text branches) of one Text2Video-Zero video,
    as both t2vz and diffusers' TextToVideoZeroPipeline run them: frame 1 alone from T to T₀ (n − t0 − 1 steps:
    T → T₁, then T₁ → T₀), then every frame, frame 1 again included, from T₁ to 0 (t1 + 1 steps).
    Total n + t1 − t0: 53 at the defaults n=50, t0=44, t1=47."""
    first = num_inference_steps - t0 - 1
    every = t1 + 1
    return {"first_frame": first, "all_frames": every, "total": first + every}


class CallCounter:
    """Counts a module's forward calls and the rows (batch entries) they carried: `with CallCounter(unet) as c:`."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.calls, self.rows, self._handle = module, 0, 0, None

    def _hook(self, module, args, kwargs) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        self.calls += 1
        self.rows += int(x.shape[0])

    def __enter__(self) -> "CallCounter":
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status (VmHWM: peak resident set size, VmRSS: current), KiB; None where there
    is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _vm_hwm_kib() -> int | None:
    return _proc_status_kib("VmHWM")


def current_rss_mib() -> float | None:
    """This process's resident set size now (VmRSS), MiB; None where there is no procfs."""
    rss = _proc_status_kib("VmRSS")
    return None if rss is None else rss / 1024


def trim_heap() -> bool:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc `malloc_trim(0)`), so that memory a
    previous run freed but the allocator kept does not count as this process's resident set. Returns whether
    the heap could be trimmed (glibc only)."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's allocator statistics, and on Linux the process's RSS high-water mark
    (`echo 5 > /proc/self/clear_refs`) after `trim_heap`, so that every implementation and video length starts
    from the memory it holds, not from what its warm-up left in the allocator. Returns whether the RSS peak
    could be reset."""
    trim_heap()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The process's peak RSS since its start or the last `reset_peak_memory`, MiB.

    On Linux this reads VmHWM: `getrusage(RUSAGE_SELF).ru_maxrss` there also carries the high-water mark of the
    process that spawned this one (the kernel folds the pre-exec memory image into it at exec), so a fresh
    subprocess of a large parent reports the parent's peak. Elsewhere, ru_maxrss (KiB on Linux, bytes on macOS)."""
    hwm = _vm_hwm_kib()
    if hwm is not None:
        return hwm / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of the measured run, MiB: `torch.cuda.max_memory_allocated` on CUDA, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _prepacked_convolution_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """2 · (output elements) · (input channels per group) · kh · kw, as FlopCounterMode counts `aten.convolution`."""
    _, c_in_per_group, kh, kw = w_shape
    return 2 * math.prod(out_shape) * c_in_per_group * kh * kw


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), FLOPs it ran) by `torch.utils.flop_counter.FlopCounterMode`: matmuls, convolutions and attention
    (2 per multiply-add); elementwise ops, norms and softmax are not counted. PyTorch's table lacks the CPU
    flash-attention kernel that `scaled_dot_product_attention` runs on CPU and oneDNN's prepacked convolution
    (`sd/onednn.py`); both are counted here, like the CUDA attention kernels and `aten.convolution`."""
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flop
    if hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        mapping[torch.ops.mkldnn._convolution_pointwise] = _prepacked_convolution_flop
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The device's peak dense FLOP/s for dtype "fp16" | "bf16" | "fp32", or None when it is not in PEAK_TFLOPS."""
    for key, table in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return table[dtype] * 1e12 if dtype in table else None
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The /proc/cpuinfo flags that reduced-precision speed on the CPU depends on, most specific first: AMX tiles with
# bf16/fp16 matmul units (Sapphire Rapids and later), AVX-512 dot products and conversions in bf16 and arithmetic in
# fp16, AVX-NE-CONVERT (bf16/fp16 loads on AVX2-only parts), and the AVX-512 / AVX2 baselines that ATen's kernels
# are built for. A missing flag is as informative as a present one: it says which path cannot run here.
CPU_FLAGS = ("amx_bf16", "amx_fp16", "amx_tile", "avx512_bf16", "avx512_fp16", "avx_ne_convert", "avx512f",
             "avx512bw", "avx512vl", "avx2")
# Environment variables that cap what PyTorch uses below what the CPU has: ATen's vectorised kernels
# (ATEN_CPU_CAPABILITY=default|avx2|avx512) and oneDNN's (ONEDNN_MAX_CPU_ISA=AVX2, AVX512_CORE_BF16, ...).
CPU_ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def cpuinfo_flags(path: str | os.PathLike = "/proc/cpuinfo") -> set[str] | None:
    """The first processor's flags in `path` (Linux's /proc/cpuinfo), or None where there is no such file (macOS,
    Windows) or it lists no flags (some non-x86 kernels call them "Features"; those are not x86 flags anyway)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _onednn_supports(kind: str) -> bool | None:
    """oneDNN's own answer to "will bf16 (or fp16) run natively?", which honours ONEDNN_MAX_CPU_ISA; None where
    this torch lacks the private probe (`torch.ops.mkldnn._is_mkldnn_<kind>_supported`) or it fails."""
    try:
        return bool(getattr(torch.ops.mkldnn, f"_is_mkldnn_{kind}_supported")())
    except (AttributeError, RuntimeError):
        return None


def cpu_features(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict[str, Any]:
    """What the CPU offers and what PyTorch will use of it:

    - `flags`: the CPU_FLAGS present in /proc/cpuinfo, `missing`: those absent (both None without /proc/cpuinfo);
    - `aten_isa`: `torch.backends.cpu.get_cpu_capability()`, the instruction set ATen's kernels dispatch to
      ("AVX512", "AVX2", "DEFAULT", ...; it honours ATEN_CPU_CAPABILITY);
    - `onednn_bf16`, `onednn_fp16`: whether oneDNN runs bf16 / fp16 natively (honours ONEDNN_MAX_CPU_ISA; with
      ONEDNN_MAX_CPU_ISA=AVX2 both are False even on an AMX machine), None if unknown;
    - `env`: the CPU_ISA_ENV variables that are set.

    The flags alone can mislead: an AMX CPU capped by ONEDNN_MAX_CPU_ISA runs bf16 as slowly as one without AMX."""
    present = cpuinfo_flags(cpuinfo)
    try:
        aten_isa = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        aten_isa = None
    return {
        "flags": None if present is None else [f for f in CPU_FLAGS if f in present],
        "missing": None if present is None else [f for f in CPU_FLAGS if f not in present],
        "aten_isa": aten_isa, "onednn_bf16": _onednn_supports("bf16"), "onednn_fp16": _onednn_supports("fp16"),
        "env": {k: os.environ[k] for k in CPU_ISA_ENV if k in os.environ},
    }


def cpu_features_line(features: dict[str, Any]) -> str:
    """`cpu_features` in one line: "CPU flags: amx_bf16 amx_tile avx512_bf16 ... (no amx_fp16, avx_ne_convert);
    ATen ISA AVX512; oneDNN bf16 yes, fp16 yes" (and the ISA-capping variables where set)."""
    def yes_no(value: bool | None) -> str:
        return "unknown" if value is None else ("yes" if value else "no")

    if features["flags"] is None:
        flags = "unknown (no /proc/cpuinfo flags)"
    else:
        flags = " ".join(features["flags"]) or "none of " + " ".join(CPU_FLAGS)
        if features["flags"] and features["missing"]:
            flags += f" (no {', '.join(features['missing'])})"
    line = (f"CPU flags: {flags}; ATen ISA {features['aten_isa'] or 'unknown'}; "
            f"oneDNN bf16 {yes_no(features['onednn_bf16'])}, fp16 {yes_no(features['onednn_fp16'])}")
    if features["env"]:
        line += "; " + ", ".join(f"{k}={v}" for k, v in features["env"].items())
    return line


def machine_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: CPU model, cores and features (`cpu_features`, and `cpu_flags_line`, its text),
    memory, torch version and threads, the device's name."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    features = cpu_features()
    info = {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable, "memory_gib": memory_gib,
        "cpu_features": features, "cpu_flags_line": cpu_features_line(features),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


# ------------------------------------------------------------------------------------------- SDPA backend scope
SDPA_BACKENDS = ("auto", "flash", "efficient", "math", "cudnn")


def sdpa_backend(name: str):
    """The `torch.nn.attention.SDPBackend` of a name in SDPA_BACKENDS other than "auto"; ValueError otherwise."""
    from torch.nn.attention import SDPBackend

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
    if name not in backends:
        raise ValueError(f"sdpa backend {name!r} is not one of {', '.join(backends)} (auto forces none)")
    return backends[name]


class ForcedSDPA:
    """`module`'s forward run under `torch.nn.attention.sdpa_kernel(backend)`, and nothing else: installed on a
    pipeline's UNet, the text encoder (CLIP's causal-masked attention) and the VAE's attention (one 512-wide head
    in SD) keep PyTorch's default dispatch, where a forced flash or efficient kernel may have "No available
    kernel" for them. `ForcedSDPA(pipe.unet, "flash")`; `.remove()` restores the module's own forward.

    It wraps the instance's `forward` rather than using hooks, so that the context manager is a plain `with` (left
    on an exception too). Installed on a `torch.compile`d module (an OptimizedModule, whose instance `forward` is
    the compiled one), the backend is set outside the compiled code, before dynamo reads it when it traces."""

    def __init__(self, module: torch.nn.Module, backend: str):
        from torch.nn.attention import sdpa_kernel

        chosen = sdpa_backend(backend)
        self.module, self.backend = module, backend
        self._own = module.__dict__.get("forward")  # an OptimizedModule's compiled forward, or None
        inner = module.forward

        def forward(*args, **kwargs):
            with sdpa_kernel(chosen):
                return inner(*args, **kwargs)

        module.forward = forward

    def remove(self) -> None:
        if self._own is not None:
            self.module.forward = self._own
        else:
            del self.module.forward

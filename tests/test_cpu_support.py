"""Every dtype runs on every CPU (t2vz/sd/onednn.py, t2vz/sd/loading.py): oneDNN's prepacked convolutions are used
only where the running CPU computes that dtype, elsewhere the plain `nn.Conv2d` path runs with one logged note.

The suite runs on one CPU, so `test_restricted_instruction_set` proves the rest for older ones: it runs the dtype,
pipeline, command-line and benchmark-smoke tests again in a subprocess with PyTorch's `ATEN_CPU_CAPABILITY=avx2`
and oneDNN's `ONEDNN_MAX_CPU_ISA=AVX2`, the variables those libraries read to behave as on a CPU with AVX2 only
(no AVX-512, AVX-512 BF16/FP16, AVX-NE-CONVERT or AMX: most AMD Zen 2-4 and pre-Sapphire-Rapids Intel parts).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from torch import nn

import t2vz
from t2vz.sd import loading, onednn
from t2vz.sd.onednn import PrepackedConv2d, native_arithmetic, onednn_supports, reduced_precision_note

REPO = Path(__file__).resolve().parents[1]
RESTRICTED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
INNER = "T2VZ_RESTRICTED_ISA_RUN"  # set in the subprocess, so that it does not start another
# what the restricted run repeats: the reduced-precision pipelines and this file's in-process tests, the pipelines'
# parity with diffusers (fp32, at AVX2), the benchmark's end-to-end smoke run
RESTRICTED_TESTS = ["tests/test_dtypes.py", "tests/test_cpu_support.py", "tests/test_pipeline.py",
                    "tests/test_benchmark.py::test_small_preset_runs_end_to_end"]
REDUCED = [torch.bfloat16, torch.float16]


def convolutions(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


@pytest.fixture
def unsupported(monkeypatch):
    """This CPU's oneDNN as one without bf16 and fp16 kernels (what `onednn_supports` says on an AVX2 CPU)."""
    monkeypatch.setattr(onednn, "onednn_supports", lambda dtype: dtype == torch.float32)
    monkeypatch.setattr(loading, "onednn_supports", onednn.onednn_supports)
    onednn.note_reduced_precision.cache_clear()
    yield
    onednn.note_reduced_precision.cache_clear()


@pytest.mark.parametrize("dtype", REDUCED, ids=["bf16", "fp16"])
def test_convolutions_are_prepacked_only_where_the_cpu_supports_the_dtype(dtype):
    sd = t2vz.load("toyworld", dtype=dtype)
    convs = convolutions(sd.unet) + convolutions(sd.vae)  # the VAE stays float32 under float16 (vae_dtype_for)
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convolutions(sd.unet))
    for c in convs:
        reduced = loading.channels_last_for("cpu", c.weight.dtype)
        assert isinstance(c, PrepackedConv2d) == (reduced and onednn_supports(c.weight.dtype))
    assert (reduced_precision_note(dtype) is None) == (onednn_supports(dtype) and native_arithmetic(dtype))


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_an_unsupported_dtype_takes_the_plain_path_with_one_note(unsupported, caplog, dtype, name):
    with caplog.at_level(logging.WARNING, logger="t2vz.sd.onednn"):
        first = t2vz.load("toyworld", dtype=dtype)
        t2vz.load("toyworld", dtype=dtype)  # a second model in the same process: no second note
    assert not any(isinstance(c, PrepackedConv2d) for c in convolutions(first.unet) + convolutions(first.vae))
    notes = [r.getMessage() for r in caplog.records if r.name == "t2vz.sd.onednn"]
    assert len(notes) == 1 and "\n" not in notes[0], notes
    assert notes[0].startswith(f"dtype={name}: this CPU's oneDNN has no {name} kernels")
    assert notes[0].endswith("dtype=fp32 is faster on this CPU")


def test_the_note_names_bf16_for_fp16_where_only_bf16_is_supported(monkeypatch):
    monkeypatch.setattr(onednn, "onednn_supports", lambda dtype: dtype != torch.float16)
    monkeypatch.setattr(onednn, "native_arithmetic", lambda dtype: True)
    assert reduced_precision_note(torch.float16).endswith("dtype=bf16 or dtype=fp32 is faster on this CPU")
    assert reduced_precision_note(torch.bfloat16) is None and reduced_precision_note(torch.float32) is None


def test_kernels_without_the_fast_instructions_get_their_own_note(monkeypatch):
    """oneDNN runs bf16 on AVX-512 without AVX-512 BF16 or AMX, but slower than fp32, and fp16 on AVX-512 FP16
    without AMX-FP16 no faster than it (docs/performance.md)."""
    monkeypatch.setattr(onednn, "onednn_supports", lambda dtype: True)
    monkeypatch.setattr(onednn, "native_arithmetic", lambda dtype: dtype == torch.float32)
    assert reduced_precision_note(torch.bfloat16) == (
        "dtype=bf16: this CPU has no AVX-512 BF16 or AMX, without which bf16 is no faster than fp32 "
        "(docs/performance.md, bf16 on the CPU); dtype=fp32 is as fast or faster on this CPU")
    assert reduced_precision_note(torch.float16).startswith("dtype=fp16: this CPU has no AMX-FP16")
    monkeypatch.setattr(onednn, "native_arithmetic", lambda dtype: dtype != torch.float16)  # bf16 is fast
    assert reduced_precision_note(torch.float16).endswith("dtype=bf16 is faster on this CPU")


def test_onednn_isa_cap_is_read_as_onednn_orders_its_instruction_sets(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")  # the CPU of AVX-512 without BF16, FP16 or AMX
    assert onednn._isa_allows("AVX512_CORE") and not onednn._isa_allows("AVX512_CORE_BF16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX10_1_512_AMX")  # a synonym of AVX512_CORE_AMX
    assert onednn._isa_allows("AVX512_CORE_AMX") and not onednn._isa_allows("AVX512_CORE_AMX_FP16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "NOT_AN_ISA")  # oneDNN ignores names it does not know
    assert onednn._isa_allows("AVX512_CORE_AMX_FP16")


@torch.no_grad()
@pytest.mark.parametrize("dtype", REDUCED, ids=["bf16", "fp16"])
def test_a_prepacked_convolution_falls_back_to_conv2d_where_unsupported(unsupported, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).to(dtype)
    packed = PrepackedConv2d.of(conv)
    x = torch.randn(2, 8, 6, 6, dtype=dtype)
    assert torch.equal(packed(x), conv(x))
    assert not hasattr(packed, "_packed")  # oneDNN's reorder, the op that raises on such a CPU, was never called


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_the_command_line_writes_the_video_in_reduced_precision(tmp_path, dtype):
    """What a user types (`t2vz prompt=... dtype=fp16`) on the shipped toy model, shortened to 3 frames and 4
    steps so that the restricted run, where these dtypes take PyTorch's reference kernels, stays short."""
    proc = subprocess.run([sys.executable, "-m", "t2vz", "prompt=a red circle on grass", f"dtype={dtype}",
                           "video.num_frames=3", "sampler.num_inference_steps=4", "output.progress=false",
                           f"hydra.run.dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = iio.imread(tmp_path / "video.gif")
    assert frames.shape[0] == 3 and frames.std() > 1  # three frames with something drawn in them
    output = proc.stdout + proc.stderr  # Hydra logs to the console (stdout) and to t2vz.log
    note = reduced_precision_note(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype]))
    assert output.count(f"dtype={dtype}: this CPU") == (0 if note is None else 1)
    assert note is None or note in output
    assert "Traceback" not in output


@pytest.mark.skipif(bool(os.environ.get(INNER)), reason="already inside the restricted-ISA run")
def test_restricted_instruction_set():
    """The restricted run: the environment must take effect (PyTorch at AVX2, oneDNN without bf16 and fp16 kernels),
    then every test of RESTRICTED_TESTS passes under it."""
    env = {**os.environ, **RESTRICTED, INNER: "1"}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability(), "
                            "torch.ops.mkldnn._is_mkldnn_bf16_supported(), torch.ops.mkldnn._is_mkldnn_fp16_supported())"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["AVX2", "False", "False"], probe.stdout + probe.stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not full",
                           *RESTRICTED_TESTS], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout.splitlines()[-1] and " failed" not in proc.stdout.splitlines()[-1], tail

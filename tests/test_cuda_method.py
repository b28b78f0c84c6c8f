"""The method's loops and warp on a CUDA device: what tests/test_device_copies.py and tests/test_motion.py check on
the CPU, again where the transfers and the kernels are real.

- No host-to-device copy inside a denoising loop: a DDIM loop runs under `torch.cuda.set_sync_debug_mode("error")`
  (a copy from pageable host memory synchronises, and so raises there), and whole pipelines make as many
  "Memcpy HtoD" transfers (the profiler's CUDA activity) at two step counts.
- The warp of fp16 and bf16 latents moves every latent pixel as the fp32 warp does on the device (index grids,
  64² and 128² latents, λ = 12 and 7.3), and the toy pipeline on the device gives the CPU's frames from the same
  CPU generator, fp32, within conftest.PARITY_RTOL (the CPU parity tests' tolerance; TF32 off, as in
  tests/test_cuda_parity.py). That tolerance has not yet been measured between the two devices: these tests have
  not yet run on a GPU.

The tests carry the `cuda` marker (skipped without a CUDA device; experiments/gpu_check.sh runs them). A dry run of
the same bodies elsewhere: `T2VZ_TEST_DEVICE=cpu .venv/bin/python -m pytest tests/test_cuda_method.py` (the
CUDA-only checks, sync debug mode and the profiler's transfers, then check nothing).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from conftest import assert_parity, without_tf32

import t2vz
from t2vz.method.motion import translation_path, warp_latents
from t2vz.method.sampling import ddim_loop
from t2vz.sd.schedulers import DDIM

DEVICE = torch.device(os.environ.get("T2VZ_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
pytestmark = [pytest.mark.cuda] if ON_CUDA else []  # a dry run elsewhere only when asked for
TOY_RUN = dict(num_frames=2, num_inference_steps=3, t0=0, t1=1, progress=False)  # tests/test_dtypes.py's RUN


@pytest.fixture(autouse=True, scope="module")
def _full_fp32():
    with without_tf32():
        yield


@contextlib.contextmanager
def sync_debug_errors():
    """Synchronising CUDA calls (pageable host-to-device copies among them) raise inside; nothing elsewhere."""
    if not ON_CUDA:
        yield
        return
    saved = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(saved)


def host_to_device_transfers(run) -> int:
    """The "Memcpy HtoD" transfers the profiler records while `run()` runs (0 off CUDA)."""
    if not ON_CUDA:
        run()
        return 0
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if "memcpy htod" in e.name.lower())


def assert_no_transfers_per_step(few_steps, more_steps) -> None:
    """As many transfers in both runs, and some (x_T, drawn on the CPU, goes over): the count sees them."""
    few, more = host_to_device_transfers(few_steps), host_to_device_transfers(more_steps)
    assert more == few, f"{more} host-to-device transfers with more steps, {few} with fewer"
    assert few > 0 or not ON_CUDA, "no Memcpy HtoD seen at all: the profiler's event names changed?"


def test_ddim_loop_runs_without_synchronising():
    """The loop itself (timesteps, DDIM arithmetic with 0-dim CPU ᾱ's as kernel scalars) with a device-only ε: no
    step copies from the host, so none synchronises. Before: `t.to(device)` at every step raised here."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    scheduler = DDIM(5)
    with torch.no_grad(), sync_debug_errors():
        out = ddim_loop(x, scheduler, scheduler.timesteps, lambda x, t: 0.1 * x + t.to(x.dtype) / 1000,
                        progress=False)
    assert out.device.type == DEVICE.type


@pytest.fixture(scope="module")
def toy_pipe():
    return t2vz.TextToVideoZero.from_pretrained("toyworld", device=DEVICE)


def test_text_to_video_transfers_nothing_per_step(toy_pipe):
    """As many host-to-device transfers at 8 steps as at 4 (every loop runs more steps: t1 = n/2, t0 = t1 − 1)."""
    def run(n: int):
        return lambda: toy_pipe("a red circle on grass", num_frames=3, num_inference_steps=n, t0=n // 2 - 1,
                                t1=n // 2, progress=False, generator=torch.Generator().manual_seed(0))
    assert_no_transfers_per_step(run(4), run(8))


def test_control_video_transfers_nothing_per_step(toy_pipe):
    """The control maps go to the device once (a random ControlNet fitting the toy UNet)."""
    from t2vz import ControlNet, ControlNetConfig
    from t2vz.method.controlvideo import ControlVideo

    sd = toy_pipe.sd
    config = ControlNetConfig.from_unet(sd.unet.config, conditioning_embedding_out_channels=(8, 16, 16))
    pipe = ControlVideo(sd, ControlNet(config))
    maps = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))

    def run(n: int):
        return lambda: pipe("a red circle on grass", control=maps, num_inference_steps=n, progress=False,
                            generator=torch.Generator().manual_seed(0))
    assert_no_transfers_per_step(run(2), run(4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 128])
@pytest.mark.parametrize("lam", [12.0, 7.3])
def test_low_precision_warp_samples_the_fp32_pixels_on_device(dtype, n, lam):
    """tests/test_motion.py's index-grid check with the device's interpolate and grid_sample kernels."""
    ids = [0, 1, 2, 3]
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    ramps = torch.stack([rows, cols]).to(DEVICE)[None].expand(len(ids), 2, n, n)
    path = translation_path(ids, lam, (1.0, 1.0))
    expected = warp_latents(ramps.float(), path)
    actual = warp_latents(ramps.to(dtype), path)
    assert actual.dtype == dtype and torch.equal(actual.float(), expected)


def test_toy_pipeline_on_device_matches_the_cpu():
    """Same CPU generator → the same frames on the device as on the CPU, fp32, within PARITY_RTOL."""
    frames = {}
    for device in ("cpu", DEVICE):
        pipe = t2vz.TextToVideoZero.from_pretrained("toyworld", device=device)
        frames[device] = pipe("a red circle on grass", generator=torch.Generator().manual_seed(0), **TOY_RUN)
    assert frames[DEVICE].device.type == "cpu"  # decode_video returns the frames on the CPU
    assert_parity(frames[DEVICE], frames["cpu"])

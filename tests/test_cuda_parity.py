"""t2vz on a CUDA device: parity with diffusers there, half precision against fp32, the SDPA backends, compilation.

What the CPU suite checks, again where the kernels differ (cuDNN convolutions, CUDA attention kernels, inductor's
Triton code), on the same small models:

- the UNet and the VAE against diffusers' UNet2DConditionModel and AutoencoderKL on identical random weights
  (experiments/reference_models.py, as tests/test_unet.py and tests/test_vae.py build them), fp32, tolerance
  conftest.PARITY_RTOL;
- the whole Text2Video-Zero pipeline against diffusers' TextToVideoZeroPipeline, both on the device, fp32,
  PARITY_RTOL (tests/test_pipeline.py's seed-compatible set-up: t2vz with ddpm_marginal="reference"). Both take a
  CPU torch.Generator: both draw their noise on the CPU and move it (t2vz's draw_noise, diffusers' randn_tensor),
  so that a seed gives the same video on any device;
- fp16 and bf16 pipelines against fp32 on the same device, with tests/test_dtypes.py's tolerances and settings
  (the shipped toy model, 2 frames, 3 DDIM steps): fp16 max 0.015, mean 1e-3; bf16 max 0.1, mean 1e-2;
- each scaled_dot_product_attention backend forced inside the UNet (t2vz.experiment.benchmark.ForcedSDPA, what the
  benchmark's sdpa= does) against the fp32 frames of PyTorch's own choice: fp32 within PARITY_RTOL, fp16 within the
  fp16 tolerance. A "No available kernel" failure means that backend cannot run this UNet's attention shapes
  here, and so neither can the benchmark's sdpa= with it;
- the UNet torch.compile'd (inductor; the benchmark's compile=true) against eager, fp32, within PARITY_RTOL.

fp32 here means fp32: TF32 is switched off for cuDNN convolutions (on by default) and matmuls while these tests
run, as the CPU's fp32 tolerance assumes full fp32 products; half precision is untouched.

The tests carry the `cuda` marker (skipped without a CUDA device; experiments/gpu_check.sh runs them). For a dry
run of the same test bodies on another device, set T2VZ_TEST_DEVICE explicitly, e.g.
`T2VZ_TEST_DEVICE=cpu .venv/bin/python -m pytest tests/test_cuda_parity.py`: the marker is then left off so that
they run, and the CUDA-only SDPA backends (efficient, cudnn) are left out.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import assert_parity, without_tf32
from reference_models import (
    TINY_UNET, TINY_VAE, diffusers_unet, diffusers_vae, text_to_video_zero_pipeline, tiny_reference_folder,
)

import t2vz
from t2vz.experiment.benchmark import ForcedSDPA, denoising_steps
from t2vz.sd.loading import build_loaded
from t2vz.sd.unet import UNet
from t2vz.sd.vae import AutoencoderKL

try:
    DEVICE = torch.device(os.environ.get("T2VZ_TEST_DEVICE", "cuda"))
except RuntimeError as e:
    raise RuntimeError(f"T2VZ_TEST_DEVICE={os.environ['T2VZ_TEST_DEVICE']!r} is not a torch device (cuda, cuda:1, "
                       f"cpu): {e}") from None
pytestmark = [pytest.mark.cuda] if DEVICE.type == "cuda" else []  # a dry run elsewhere only when asked for

# tests/test_dtypes.py's tolerances (measured there on the CPU: fp16 0.005 max, 3e-4 mean; bf16 0.04, 3e-3; ~3x)
HALF_TOLERANCE = {torch.float16: (0.015, 1e-3), torch.bfloat16: (0.1, 1e-2)}
TOY_RUN = dict(num_frames=2, num_inference_steps=3, t0=0, t1=1, progress=False)  # tests/test_dtypes.py's RUN
TOY_PROMPT = "a red circle on grass"
# the backends each dtype can run on the device: flash and cuDNN attention take fp16/bf16 only on CUDA; on the
# CPU there are the math and the flash kernels (any dtype)
SDPA_CASES = ([(torch.float32, b) for b in ("math", "efficient")]
              + [(torch.float16, b) for b in ("math", "flash", "efficient", "cudnn")]
              if DEVICE.type == "cuda" else
              [(dtype, b) for dtype in (torch.float32, torch.float16) for b in ("math", "flash")])


@pytest.fixture(autouse=True, scope="module")
def _full_fp32():
    with without_tf32():
        yield


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """Test inputs drawn on the CPU, then moved: the same values on every device."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# ------------------------------------------------------------------------------------------------ UNet and VAE
@pytest.mark.parametrize("t", [981, [0, 500, 999]], ids=["int", "per-row"])
@torch.no_grad()
def test_unet_matches_diffusers_on_device(t):
    ref = diffusers_unet(TINY_UNET)
    ours = build_loaded(UNet, TINY_UNET, ref.state_dict()).eval().to(DEVICE)
    ref.to(DEVICE)
    assert ours.conv_in.weight.device.type == DEVICE.type and ref.conv_in.weight.device.type == DEVICE.type
    x, context = randn(3, 4, 16, 24), randn(3, 77, TINY_UNET.cross_attention_dim, seed=1)  # non-square latent
    t = torch.tensor(t, device=DEVICE) if isinstance(t, list) else t
    assert_parity(ours(x, t, context).cpu(), ref(x, t, context).sample.cpu())


@torch.no_grad()
def test_vae_matches_diffusers_on_device():
    ref = diffusers_vae(TINY_VAE)
    ours = build_loaded(AutoencoderKL, TINY_VAE, ref.state_dict()).eval().to(DEVICE)
    ref.to(DEVICE)
    images = randn(2, 3, 32, 48) * 0.5
    posterior = ref.encode(images).latent_dist
    assert_parity(ours.encode(images).cpu(), posterior.mode().cpu())
    sampled = ours.encode(images, generator=torch.Generator().manual_seed(7), sample=True)  # a CPU generator
    assert_parity(sampled.cpu(), posterior.sample(torch.Generator().manual_seed(7)).cpu())
    latents = randn(2, 4, 8, 12, seed=2)
    assert_parity(ours.decode(latents).cpu(), ref.decode(latents).sample.cpu())


# --------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    """t2vz and diffusers' TextToVideoZeroPipeline on the same tiny random weights, both on the device, fp32."""
    folder, refs = tiny_reference_folder(tmp_path_factory.mktemp("cuda") / "tiny")
    ours = t2vz.TextToVideoZero.from_pretrained(folder, device=DEVICE)
    return ours, text_to_video_zero_pipeline(*refs).to(DEVICE)


@pytest.mark.parametrize("kwargs", [
    dict(),  # the reference's defaults: 50 steps, t0=44, t1=47, λ=12, δ=(1, 1), guidance 7.5
    dict(num_inference_steps=12, t0=3, t1=4, motion_strength=7.0, guidance_scale=3.0, negative_prompt="blurry",
         height=32, width=48),
], ids=["defaults", "dt1-negative-non-square"])
@torch.no_grad()
def test_pipeline_seed_compatible_with_diffusers_on_device(tiny_pipes, kwargs):
    ours_pipe, ref_pipe = tiny_pipes
    assert ours_pipe.sd.unet.conv_in.weight.device.type == DEVICE.type
    assert ref_pipe.unet.device.type == DEVICE.type and ref_pipe.vae.device.type == DEVICE.type
    kwargs = {"height": 32, "width": 32, **kwargs}
    motion = kwargs.pop("motion_strength", 12.0)
    ours = ours_pipe("a horse galloping", num_frames=4, motion_strength=motion, ddpm_marginal="reference",
                     generator=torch.Generator().manual_seed(7), progress=False, **kwargs)
    ref = ref_pipe("a horse galloping", video_length=4, generator=torch.Generator().manual_seed(7),
                   motion_field_strength_x=motion, motion_field_strength_y=motion, **kwargs).images
    ref = torch.from_numpy(np.asarray(ref))
    assert ours.shape == ref.shape == (4, kwargs["height"], kwargs["width"], 3)
    assert_parity(ours.float().cpu(), ref)
    assert not torch.allclose(ours[0], ours[-1])  # the frames move


# ---------------------------------------------------------------------------------- precision, SDPA, compile
def toy_frames(dtype: torch.dtype = torch.float32, unet_wrapper=None) -> torch.Tensor:
    """The shipped toy model's frames on the device in `dtype` (test_dtypes.py's run), float32 on the CPU;
    `unet_wrapper(pipe)` may change the pipeline's UNet first."""
    pipe = t2vz.TextToVideoZero.from_pretrained("toyworld", device=DEVICE, dtype=dtype)
    if unet_wrapper is not None:
        unet_wrapper(pipe)
    frames = pipe(TOY_PROMPT, generator=torch.Generator().manual_seed(0), **TOY_RUN)
    assert frames.dtype == torch.float32 and torch.isfinite(frames).all()
    return frames.cpu()


@pytest.fixture(scope="module")
def fp32_toy_frames():
    return toy_frames()


def assert_within(frames: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: the parity tolerance; fp16/bf16: test_dtypes.py's max and mean bounds."""
    if dtype == torch.float32:
        assert_parity(frames, reference)
        return
    max_diff, mean_diff = HALF_TOLERANCE[dtype]
    diff = (frames - reference).abs()
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max().item(), diff.mean().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_pipeline_on_device(fp32_toy_frames, dtype):
    pipe = t2vz.TextToVideoZero.from_pretrained("toyworld", device=DEVICE, dtype=dtype)
    assert pipe.sd.unet.conv_in.weight.dtype == dtype and pipe.sd.unet.conv_in.weight.device.type == DEVICE.type
    assert pipe.sd.vae.post_quant_conv.weight.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert_within(toy_frames(dtype), fp32_toy_frames, dtype)


@pytest.mark.parametrize("dtype, backend", SDPA_CASES, ids=[f"{str(d)[6:]}-{b}" for d, b in SDPA_CASES])
def test_forced_sdpa_backend_in_the_unet(fp32_toy_frames, dtype, backend):
    calls = []

    def force(pipe):
        ForcedSDPA(pipe.sd.unet, backend)
        pipe.sd.unet.register_forward_pre_hook(lambda m, a: calls.append(1))

    assert_within(toy_frames(dtype, force), fp32_toy_frames, dtype)
    assert len(calls) == denoising_steps(TOY_RUN["num_inference_steps"], TOY_RUN["t0"], TOY_RUN["t1"])["total"]


def test_compiled_unet_matches_eager(fp32_toy_frames):
    torch._dynamo.reset()
    try:
        compiled = toy_frames(unet_wrapper=lambda pipe: setattr(pipe.sd, "unet", torch.compile(pipe.sd.unet)))
    finally:
        torch._dynamo.reset()
    assert_parity(compiled, fp32_toy_frames)

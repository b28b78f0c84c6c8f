"""The half-precision paths, exercised on the CPU (the CUDA runs use the same code): float16 keeps the VAE in
float32 so that decoding cannot overflow, bfloat16 runs everything in bfloat16, and both stay close to float32.

Tolerances are measured on the shipped toy model, 2 frames, 3 DDIM steps (frames in [0, 1]): float16 differs
from float32 by at most 0.005 (mean 3e-4), bfloat16 by at most 0.04 (mean 3e-3); the bounds below are ~3x that.
"""
import pytest
import torch

import t2vz
from t2vz.sd.loading import vae_dtype_for
from t2vz.sd.vae import AutoencoderKL, VAEConfig

RUN = dict(num_frames=2, num_inference_steps=3, t0=0, t1=1, progress=False)


@pytest.fixture(scope="module")
def fp32_frames():
    pipe = t2vz.TextToVideoZero.from_pretrained("toyworld")
    return pipe("a red circle on grass", generator=torch.Generator().manual_seed(0), **RUN)


@pytest.mark.parametrize("dtype, vae_dtype, max_diff, mean_diff", [
    (torch.float16, torch.float32, 0.015, 1e-3),
    (torch.bfloat16, torch.bfloat16, 0.1, 1e-2),
])
def test_half_precision_pipeline(fp32_frames, dtype, vae_dtype, max_diff, mean_diff):
    pipe = t2vz.TextToVideoZero.from_pretrained("toyworld", dtype=dtype)
    assert pipe.sd.dtype == dtype and pipe.sd.unet.conv_in.weight.dtype == dtype
    assert pipe.sd.vae.post_quant_conv.weight.dtype == vae_dtype
    frames = pipe("a red circle on grass", generator=torch.Generator().manual_seed(0), **RUN)
    assert frames.dtype == torch.float32 and torch.isfinite(frames).all()
    diff = (frames - fp32_frames).abs()
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max().item(), diff.mean().item())


def test_vae_dtype_can_be_chosen():
    sd = t2vz.load("toyworld", dtype=torch.float16, vae_dtype=torch.float16)
    assert sd.vae.post_quant_conv.weight.dtype == torch.float16


@torch.no_grad()
def test_float16_decoder_overflow_is_what_the_float32_vae_avoids():
    """A decoder whose activations pass 65504 decodes to inf/NaN in float16 (black frames) and to finite images
    in float32 from the same float16 latents: why `vae_dtype_for(float16)` is float32."""
    assert vae_dtype_for(torch.float16) == torch.float32
    assert vae_dtype_for(torch.bfloat16) == torch.bfloat16 and vae_dtype_for(torch.float32) == torch.float32
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 64))).eval()
    vae.decoder.conv_in.weight.mul_(1e5)  # the first activations reach ~1e5, beyond float16's 65504
    latents = torch.randn(1, 4, 8, 8).half()
    assert not torch.isfinite(AutoencoderKL.decode(vae.half(), latents)).all()
    assert torch.isfinite(vae.float().decode(latents)).all()

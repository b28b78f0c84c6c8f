"""DDIM inversion: `DDIM.inverse_step` and `ddim_invert` against diffusers' `DDIMInverseScheduler` (built, as
diffusers' pipelines build it, from SD 1.5's DDIM config) driving the same UNet; fp32, tolerance
conftest.PARITY_RTOL (rtol 1e-4, atol 1e-4·max|reference|) where not bitwise."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_parity
from diffusers import DDIMInverseScheduler, DDIMScheduler
from reference_models import SD15_UNET, TINY_UNET, diffusers_unet

from t2vz.method.inversion import Inversion, ddim_invert, inversion_loop
from t2vz.method.sampling import ddim_loop
from t2vz.sd.loading import StableDiffusion, build_loaded
from t2vz.sd.schedulers import DDIM
from t2vz.sd.unet import UNet

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1,
            set_alpha_to_one=False, timestep_spacing="leading")


def ref_inverse(n: int) -> DDIMInverseScheduler:
    """As diffusers' pipelines make it: DDIMInverseScheduler.from_config(the pipeline's DDIM config)."""
    s = DDIMInverseScheduler.from_config(DDIMScheduler(**SD15).config)
    s.set_timesteps(n)
    return s


def fake_eps(x: torch.Tensor, t) -> torch.Tensor:
    pattern = torch.linspace(-1, 1, x.numel(), dtype=torch.float32).reshape(x.shape)
    return 0.1 * x + torch.sin(3 * pattern + int(t) / 100)


@pytest.mark.parametrize("n", [1, 10, 20, 50])
def test_inversion_timesteps_equal_diffusers(n):
    assert torch.equal(DDIM(n).inversion_timesteps(), ref_inverse(n).timesteps)


@pytest.mark.parametrize("n", [10, 50])
def test_inverse_step_bitwise_equal_to_diffusers(n):
    """Step by step on the same inputs, every timestep including the first (from ᾱ_0)."""
    ours, ref = DDIM(n), ref_inverse(n)
    gen = torch.Generator().manual_seed(n)
    for t in ref.timesteps:
        x, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        mine, x0 = ours.inverse_step(eps, t, x)
        theirs = ref.step(eps, t, x)
        assert torch.equal(mine, theirs.prev_sample), int(t)
        assert torch.equal(x0, theirs.pred_original_sample), int(t)


def test_first_step_starts_from_alpha_bar_0():
    """The convention: x₀ sits at ᾱ_0 = alphas_cumprod[0], where the sampler's final step ends; so with a noise
    prediction that ignores x the first inverse step undoes the last sampling step exactly."""
    s = DDIM(50)
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    x1, _ = s.inverse_step(eps, 1, x0)
    a0, a1 = s.alphas_cumprod[0], s.alphas_cumprod[1]
    assert_parity(x1, a1.sqrt() * (x0 - (1 - a0).sqrt() * eps) / a0.sqrt() + (1 - a1).sqrt() * eps)
    back, _ = s.step(eps, 1, x1)
    assert_parity(back, x0)


@pytest.mark.parametrize("n", [10, 50])
def test_inversion_then_sampling_returns_x0_when_eps_ignores_x(n):
    """DDIM is exactly invertible when ε̂ does not depend on x: inverting all the way and sampling back gives x₀."""
    s = DDIM(n)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pattern = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def eps(x, t):
        return pattern * torch.cos(t.float() / 300)
    inverted = inversion_loop(x0, s, s.inversion_timesteps(), eps, progress=False)
    assert len(inverted.latents) == n + 1 and inverted.latents[0] is x0
    torch.testing.assert_close(ddim_loop(inverted.final, s, s.timesteps, eps, progress=False), x0,
                               rtol=1e-4, atol=1e-4)


def test_inversion_loop_trajectory_bitwise_equal_to_diffusers():
    ours, ref = DDIM(20), ref_inverse(20)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    inverted = inversion_loop(x, ours, ours.inversion_timesteps(), fake_eps, progress=False)
    for i, t in enumerate(ref.timesteps):
        x = ref.step(fake_eps(x, t), t, x).prev_sample
        assert torch.equal(inverted.at(t), x)
        assert inverted.latents[i + 1] is inverted.at(t)


def sd_with_unet(unet: UNet) -> StableDiffusion:
    return StableDiffusion(unet=unet, vae=None, text_encoder=None)


def reference_trajectory(unet, x, context, n: int, guidance_scale: float, steps: int | None = None):
    """diffusers' inversion as its pipelines run it: DDIMInverseScheduler.step on the diffusers UNet's ε."""
    s = ref_inverse(n)
    latents = []
    for t in s.timesteps[:steps]:
        if guidance_scale > 1:
            uncond, text = unet(torch.cat([x, x]), t, context).sample.chunk(2)
            eps = uncond + guidance_scale * (text - uncond)
        else:
            eps = unet(x, t, context).sample
        x = s.step(eps, t, x).prev_sample
        latents.append(x)
    return latents


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
@torch.no_grad()
def test_ddim_invert_matches_diffusers_on_tiny_unet(guidance_scale):
    ref = diffusers_unet(TINY_UNET)
    ours = build_loaded(UNet, TINY_UNET, ref.state_dict()).eval()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 16, 16, generator=gen)
    rows = 4 if guidance_scale > 1 else 2
    context = torch.randn(rows, 77, TINY_UNET.cross_attention_dim, generator=gen)
    inverted = ddim_invert(sd_with_unet(ours), x0, context, DDIM(10), guidance_scale=guidance_scale,
                           progress=False)
    expected = reference_trajectory(ref, x0, context, 10, guidance_scale)
    assert len(inverted.latents) == 11
    for mine, theirs in zip(inverted.latents[1:], expected):
        assert_parity(mine, theirs)


@pytest.mark.full
@torch.no_grad()
def test_ddim_invert_matches_diffusers_on_sd15_unet():
    """The full SD 1.5 UNet (random perturbed weights), an 8×8 latent: a whole 5-step inversion and the first
    four steps of a 50-step one (the smallest ᾱ gaps, where ε's error weighs most)."""
    ref = diffusers_unet(SD15_UNET)
    ours = build_loaded(UNet, SD15_UNET, ref.state_dict()).eval()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, 768, generator=gen)
    sd = sd_with_unet(ours)
    for n, steps in ((5, None), (50, 4)):
        s = DDIM(n)
        inverted = ddim_invert(sd, x0, context, s, timesteps=s.inversion_timesteps()[:steps], progress=False)
        for mine, theirs in zip(inverted.latents[1:], reference_trajectory(ref, x0, context, n, 1.0, steps),
                                strict=True):
            assert_parity(mine, theirs)


def test_inversion_timesteps_up_to_and_errors():
    s = DDIM(50)
    assert s.inversion_timesteps(up_to=941).tolist() == list(range(1, 942, 20))
    with pytest.raises(ValueError, match="up_to=940 is not one of this schedule's timesteps"):
        s.inversion_timesteps(up_to=940)
    with pytest.raises(ValueError, match="must be ascending"):
        inversion_loop(torch.zeros(1, 4, 2, 2), s, torch.tensor([21, 1]), fake_eps, progress=False)
    inverted = Inversion(timesteps=torch.tensor([1, 21]), latents=[torch.zeros(1)] * 3)
    with pytest.raises(ValueError, match="timestep 41 was not inverted to"):
        inverted.at(41)
    with pytest.raises(ValueError, match="eps shape"):
        s.inverse_step(torch.zeros(1, 4, 2, 2), 1, torch.zeros(1, 4, 2, 3))

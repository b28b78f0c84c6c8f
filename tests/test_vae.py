"""VAE parity with diffusers' AutoencoderKL (copied, perturbed weights), fp32, tolerance: conftest.PARITY_RTOL."""
import pytest
import torch
from conftest import assert_parity
from reference_models import SD15_VAE, TINY_VAE, diffusers_vae

from t2vz.sd.loading import build_loaded
from t2vz.sd.vae import AutoencoderKL, VAEConfig


def ours_from(ref, cfg: VAEConfig) -> AutoencoderKL:
    return build_loaded(AutoencoderKL, cfg, ref.state_dict()).eval()  # shares the reference's tensors


@pytest.fixture(scope="module")
def tiny():
    ref = diffusers_vae(TINY_VAE)
    return ref, ours_from(ref, TINY_VAE)


@torch.no_grad()
def test_tiny_encode_mode_and_sample(tiny):
    ref, ours = tiny
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    posterior = ref.encode(images).latent_dist
    assert_parity(ours.encode(images), posterior.mode())
    ours_sample = ours.encode(images, generator=torch.Generator().manual_seed(7), sample=True)
    assert_parity(ours_sample, posterior.sample(torch.Generator().manual_seed(7)))


@torch.no_grad()
def test_tiny_decode(tiny):
    ref, ours = tiny
    latents = torch.randn(2, 4, 8, 12)
    assert_parity(ours.decode(latents), ref.decode(latents).sample)


@pytest.mark.full
@torch.no_grad()
def test_sd15_vae_matches_diffusers():
    """The full SD 1.5 VAE (83.7M parameters), random perturbed weights, 64×64 images ↔ 8×8 latents."""
    ref = diffusers_vae(SD15_VAE)
    ours = ours_from(ref, SD15_VAE)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert ours.downsample_factor == 8
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    assert_parity(ours.encode(images), ref.encode(images).latent_dist.mode())
    latents = torch.randn(1, 4, 8, 8)
    assert_parity(ours.decode(latents), ref.decode(latents).sample)

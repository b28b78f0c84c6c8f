"""t2vz.load + text encoder + text_to_image against diffusers' StableDiffusionPipeline on the same weights:
same seed → same image (fp32, tolerance conftest.PARITY_RTOL)."""
import pytest
import torch
from conftest import assert_parity
from reference_models import (
    SD15_CLIP, TINY_CLIP, TINY_VAE, clip_text_model, diffusers_unet, diffusers_vae, stable_diffusion_pipeline,
    tiny_reference_folder, write_t2vz_folder,
)

import t2vz
from t2vz.method.sampling import encode_prompts
from t2vz.sd.unet import UNetConfig


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder, refs = tiny_reference_folder(tmp_path_factory.mktemp("m") / "tiny")
    return t2vz.load(folder), stable_diffusion_pipeline(*refs)


@torch.no_grad()
def test_text_encoder_matches_pipeline_encode_prompt(models):
    sd, pipe = models
    prompts = ["a red triangle over green grass", "An astronaut riding a horse, on Mars! " * 6]  # 2nd truncates
    ours = encode_prompts(sd, prompts, ["blurry", "ugly"]).context
    text, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=["blurry", "ugly"])
    assert ours.shape == (4, 77, TINY_CLIP["hidden_size"])
    assert_parity(ours, torch.cat([uncond, text]))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_inference_steps=10),
        dict(num_inference_steps=7, guidance_scale=1.0, height=48, width=64),
        dict(num_inference_steps=5, eta=1.0, negative_prompt="low quality"),
    ],
    ids=["cfg", "no-cfg-non-square", "eta-negative"],
)
@torch.no_grad()
def test_seed_compatible_with_stable_diffusion_pipeline(models, kwargs):
    sd, pipe = models
    kwargs = {"height": 32, "width": 32, **kwargs}
    ours = t2vz.text_to_image(sd, "a cat", generator=torch.Generator().manual_seed(42), progress=False, **kwargs)
    ref = pipe("a cat", generator=torch.Generator().manual_seed(42), output_type="pt", **kwargs).images[0]
    assert ours.shape == (kwargs["height"], kwargs["width"], 3)
    assert 0.0 <= ours.min() and ours.max() <= 1.0
    assert_parity(ours, ref.permute(1, 2, 0))
    other = t2vz.text_to_image(sd, "a cat", generator=torch.Generator().manual_seed(43), progress=False, **kwargs)
    assert not torch.allclose(other, ours)  # the seed matters: the comparison above is not vacuous


def test_bad_sizes(models):
    sd, _ = models
    assert sd.vae.downsample_factor == 2  # the tiny VAE has two levels; SD 1.5's has four (8)
    with pytest.raises(ValueError, match="height=35 must be a positive multiple of 2"):
        t2vz.text_to_image(sd, "a cat", height=35, width=32, num_inference_steps=1)


@pytest.mark.full
@torch.no_grad()
def test_sd15_text_encoder_matches_pipeline(tmp_path):
    """The full CLIP ViT-L/14 text encoder (123M parameters) through a model folder and t2vz.load."""
    unet_cfg = UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), cross_attention_dim=768)
    refs = diffusers_unet(unet_cfg), diffusers_vae(TINY_VAE), clip_text_model(SD15_CLIP)
    sd = t2vz.load(write_t2vz_folder(tmp_path / "m", unet_cfg, TINY_VAE, SD15_CLIP, *refs))
    pipe = stable_diffusion_pipeline(*refs)
    text, uncond = pipe.encode_prompt(["a photo of a cat"], "cpu", 1, True)
    assert_parity(encode_prompts(sd, ["a photo of a cat"]).context, torch.cat([uncond, text]))

"""Text2Video-Zero on Stable Diffusion XL: `TextToVideoZero` on a converted tiny SDXL model gives the frames of
diffusers' `TextToVideoZeroSDXLPipeline` for the same seed; SDXL-only keywords are refused by SD 1.5 models, and
the SD 1.5-only pipelines refuse SDXL models."""
from __future__ import annotations

import pytest
import torch
from reference_models import sd15_ddim_scheduler, tiny_reference_folder
from sdxl_fixtures import tiny_sdxl_models, write_sdxl_diffusers_folder
from test_pipeline import assert_seed_compatible

import t2vz
from t2vz.sd.text_encoder import load_sdxl_tokenizer_2, load_tokenizer
from weights_convert import convert


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """Our pipeline on a converted tiny SDXL diffusers folder, and diffusers' TextToVideoZeroSDXLPipeline on the
    same modules (SD's DDIM scheduler, as for the SD 1.5 pipeline)."""
    from diffusers import TextToVideoZeroSDXLPipeline

    tmp = tmp_path_factory.mktemp("sdxl")
    unet, vae, clip_l, bigg = tiny_sdxl_models()
    convert(write_sdxl_diffusers_folder(tmp / "diffusers", unet, vae, clip_l, bigg), tmp / "t2vz")
    ref = TextToVideoZeroSDXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=bigg, tokenizer=load_tokenizer(),
                                      tokenizer_2=load_sdxl_tokenizer_2(), unet=unet, scheduler=sd15_ddim_scheduler(),
                                      add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return t2vz.TextToVideoZero.from_pretrained(tmp / "t2vz"), ref, tmp / "t2vz"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(height=32, width=32),  # the references' defaults: 50 steps, t0=44, t1=47, λ=12, δ=(1, 1), guidance 7.5
        dict(num_inference_steps=20, t0=10, t1=15, motion_strength=40.0, direction=(-1.0, 0.5), height=48, width=64,
             negative_prompt="blurry", prompt_2="oil painting", negative_prompt_2="low contrast"),
        dict(num_inference_steps=10, t0=3, t1=3, motion_strength=24.0, guidance_scale=3.0, height=40, width=24,
             original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(40, 24)),
    ],
    ids=["defaults", "motion-non-square-prompt-2", "dt0-micro-conditioning"],
)
@torch.no_grad()
def test_seed_compatible_with_diffusers_sdxl(sdxl, kwargs):
    assert_seed_compatible(*sdxl[:2], kwargs)


@torch.no_grad()
def test_sdxl_prompt_embeds_give_the_frames_of_the_text(sdxl):
    pipe, _, _ = sdxl
    common = dict(num_frames=3, num_inference_steps=6, t0=2, t1=3, height=32, width=32, progress=False)
    text = pipe("a red circle", negative_prompt="blurry", generator=torch.Generator().manual_seed(3), **common)
    context, pooled = pipe.sd.text_encoder(["a red circle"])
    negative, negative_pooled = pipe.sd.text_encoder(["blurry"])
    embeds = pipe(prompt_embeds=context, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                  negative_pooled_prompt_embeds=negative_pooled, generator=torch.Generator().manual_seed(3), **common)
    assert torch.equal(text, embeds)


def test_sdxl_model_defaults(sdxl):
    pipe, _, folder = sdxl
    assert pipe.sd.family == "sdxl" and pipe.sd.sample_size == 1024
    assert pipe.sd.method_defaults == {"motion_strength": 12.0, "t0": 44, "t1": 47}
    assert t2vz.VideoOptions().resolve(pipe.sd).height == 1024


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_embeds=torch.zeros(1, 77, 128)), "needs pooled_prompt_embeds"),
    (dict(prompt_embeds=torch.zeros(1, 77, 128), pooled_prompt_embeds=torch.zeros(1, 7)),
     r"pooled_prompt_embeds of shape \(1, 7\), expected \(1, 32\)"),
    (dict(prompt="a cat", original_size=(512,)), "original_size=.* must be two integers"),
    (dict(prompt="a cat", prompt_2=["a", "b"]), "2 prompt_2 for 1 prompts"),
    (dict(prompt_embeds=torch.zeros(1, 77, 128), pooled_prompt_embeds=torch.zeros(1, 32), prompt_2="a dog"),
     "give prompt_2 with text, not with prompt_embeds"),
    (dict(prompt="a cat", negative_prompt_embeds=torch.zeros(1, 77, 128),
          negative_pooled_prompt_embeds=torch.zeros(1, 32), negative_prompt_2="blurry"),
     "give negative_prompt_2 with text, not with negative_prompt_embeds"),
])
def test_sdxl_bad_input_names_the_value(sdxl, kwargs, match):
    pipe, _, _ = sdxl
    with pytest.raises(ValueError, match=match):
        pipe(num_frames=2, num_inference_steps=4, t0=1, t1=2, height=32, width=32, progress=False, **kwargs)


@pytest.fixture(scope="module")
def sd15_pipe(tmp_path_factory):
    folder, _ = tiny_reference_folder(tmp_path_factory.mktemp("sd15") / "tiny")
    return t2vz.TextToVideoZero.from_pretrained(folder)


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompt_2="a dog"), "prompt_2"),
    (dict(negative_prompt_2="blurry"), "negative_prompt_2"),
    (dict(pooled_prompt_embeds=torch.zeros(1, 32)), "pooled_prompt_embeds"),
    (dict(original_size=(512, 512)), "original_size"),
    (dict(crops_coords_top_left=(0, 0)), "crops_coords_top_left"),
    (dict(target_size=(512, 512)), "target_size"),
])
def test_sd15_refuses_sdxl_keywords(sd15_pipe, kwargs, name):
    with pytest.raises(ValueError, match=rf"{name}: SDXL option\(s\), and this model is SD 1.5"):
        sd15_pipe("a cat", num_frames=2, num_inference_steps=4, t0=1, t1=2, height=32, width=32, progress=False,
                  **kwargs)


def test_sd15_pipelines_refuse_sdxl_models(sdxl):
    _, _, folder = sdxl
    with pytest.raises(t2vz.ModelFolderError, match="VideoInstructPix2Pix runs on SD 1.5 models and this one is sdxl"):
        t2vz.VideoInstructPix2Pix.from_pretrained(folder)

"""Text embeddings in place of text, in every pipeline (`sampling.encode_prompts`, diffusers' semantics):
`prompt_embeds = sd.text_encoder(prompts)` (and the negative prompt's) give the very frames the text gives
(torch.equal), for several prompts, several videos per prompt and without guidance; the unconditional branch is ""
encoded when no negative is given; text_to_image given embeddings matches diffusers' StableDiffusionPipeline given
the same embeddings; bad embeddings are refused in one line naming the shape."""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import assert_parity
from reference_models import (
    TINY_UNET, stable_diffusion_pipeline, text_to_video_zero_pipeline, tiny_instruct_pix2pix_folder,
    tiny_reference_folder,
)

import t2vz
from t2vz import ControlNetConfig
from t2vz.method.controlvideo import ControlVideo
from t2vz.method.instruct import VideoInstructPix2Pix
from t2vz.method.sampling import encode_prompts
from t2vz.sd.controlnet import ControlNet
from t2vz.sd.model_folder import write_controlnet_folder

PROMPT, NEGATIVE = "a red circle on green grass", "blurry"
VIDEO = dict(num_frames=2, height=32, width=32, num_inference_steps=4, progress=False)
TINY_CONTROLNET = ControlNetConfig.from_unet(TINY_UNET, conditioning_embedding_out_channels=(8, 16))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def frames(f: int, seed: int) -> torch.Tensor:
    """Frames (f, 32, 32, 3) in [0, 1]: a bright square moving right over faint noise (control maps, a source)."""
    video = 0.1 * torch.rand(f, 32, 32, 3, generator=seeded(seed))
    for k in range(f):
        video[k, 8:16, 4 + 4 * k : 16 + 4 * k] = 1.0
    return video


@pytest.fixture(scope="module")
def toy():
    return t2vz.TextToVideoZero.from_pretrained("toyworld")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny reference model as t2vz components and as diffusers' StableDiffusionPipeline."""
    folder, refs = tiny_reference_folder(tmp_path_factory.mktemp("m") / "tiny")
    return t2vz.load(folder), stable_diffusion_pipeline(*refs), folder


@torch.no_grad()
@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["uncond-empty", "negative"])
def test_text_to_video_zero_embeds_equal_text(toy, negative):
    encode = toy.sd.text_encoder
    text = toy(PROMPT, generator=seeded(), negative_prompt=negative, **VIDEO)
    embeds = toy(prompt_embeds=encode([PROMPT]),
                 negative_prompt_embeds=None if negative is None else encode([negative]),
                 generator=seeded(), **VIDEO)
    assert torch.equal(text, embeds)
    if negative is not None:  # mixed: embeddings for one branch, text for the other
        assert torch.equal(toy(prompt_embeds=encode([PROMPT]), negative_prompt=negative, generator=seeded(), **VIDEO),
                           text)
        assert torch.equal(toy(PROMPT, negative_prompt_embeds=encode([negative]), generator=seeded(), **VIDEO), text)
        assert not torch.equal(toy(PROMPT, generator=seeded(), **VIDEO), text)  # the negative matters


@torch.no_grad()
def test_several_prompts_videos_per_prompt_and_no_guidance(toy):
    """b = prompt_embeds rows × num_videos_per_prompt, prompt-major as the text path; guidance 1 ignores the
    negative embeddings, as diffusers; embeddings in another dtype are cast to the model's."""
    prompts = ["a red circle on grass", "a blue square on sand"]
    embeds = toy.sd.text_encoder(prompts)
    for guidance in (7.5, 1.0):
        kwargs = dict(num_videos_per_prompt=2, guidance_scale=guidance, **VIDEO)
        text = toy(prompts, generator=seeded(1), **kwargs)
        assert text.shape == (4, 2, 32, 32, 3)
        from_embeds = toy(prompt_embeds=embeds.double(), negative_prompt_embeds=torch.zeros_like(embeds),
                          generator=seeded(1), **kwargs)
        assert torch.equal(text, from_embeds) == (guidance == 1.0)  # zero negatives differ from "" under guidance
        assert torch.equal(toy(prompt_embeds=embeds.double(), generator=seeded(1), **kwargs), text)


def test_conditioning_rows():
    """The context: [uncond; text], rows prompt-major; "" for each prompt without a negative."""
    sd = t2vz.load("toyworld")
    embeds = torch.randn(2, 5, sd.unet.config.cross_attention_dim, generator=seeded(2))
    negative = torch.randn(2, 5, sd.unet.config.cross_attention_dim, generator=seeded(3))
    cond = encode_prompts(sd, None, num_per_prompt=3, prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert cond.batch == 6 and cond.prompts is None
    assert torch.equal(cond.context, torch.cat([negative.repeat_interleave(3, 0), embeds.repeat_interleave(3, 0)]))
    assert encode_prompts(sd, None, guidance=False, prompt_embeds=embeds).context.shape == (2, 5, 64)
    text = encode_prompts(sd, ["a", "b"], num_per_prompt=2)
    assert text.prompts == ["a", "a", "b", "b"]
    assert torch.equal(text.uncond, sd.text_encoder(["", ""]).repeat_interleave(2, 0))


@torch.no_grad()
def test_smoothing_with_embeds_takes_masks(toy):
    embeds = toy.sd.text_encoder([PROMPT])
    masks = torch.zeros(2, 32, 32)
    masks[:, 8:24, 8:24] = 1.0
    kwargs = dict(smooth_bg=True, masks=masks, **VIDEO)
    assert torch.equal(toy(PROMPT, generator=seeded(), **kwargs),
                       toy(prompt_embeds=embeds, generator=seeded(), **kwargs))
    with pytest.raises(ValueError, match=r"smooth_bg with prompt_embeds needs masks="):
        toy(prompt_embeds=embeds, smooth_bg=True, **VIDEO)


@torch.no_grad()
def test_text_to_image_embeds_equal_text_and_diffusers(tiny):
    sd, pipe, _ = tiny
    kwargs = dict(height=32, width=32, num_inference_steps=5, progress=False)
    embeds, negative = sd.text_encoder([PROMPT]), sd.text_encoder([NEGATIVE])
    text = t2vz.text_to_image(sd, PROMPT, negative_prompt=NEGATIVE, generator=seeded(4), **kwargs)
    ours = t2vz.text_to_image(sd, prompt_embeds=embeds, negative_prompt_embeds=negative, generator=seeded(4),
                              **kwargs)
    assert torch.equal(text, ours)
    kwargs.pop("progress")
    for negative_embeds in (negative, None):  # None: diffusers and t2vz both encode "" for the unconditional branch
        ours = t2vz.text_to_image(sd, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
                                  generator=seeded(4), progress=False, **kwargs)
        ref = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, generator=seeded(4),
                   output_type="pt", **kwargs).images[0]
        assert_parity(ours, ref.permute(1, 2, 0))


@torch.no_grad()
def test_text_to_video_zero_matches_diffusers_given_the_same_embeds(tmp_path):
    """Embeddings that no text encodes (random), on the tiny reference model: diffusers' TextToVideoZeroPipeline
    takes no prompt_embeds keyword, so its own encode_prompt is handed them (it accepts them, as in every diffusers
    pipeline); same seed → same frames."""
    folder, refs = tiny_reference_folder(tmp_path / "tiny")
    ours, ref = t2vz.TextToVideoZero.from_pretrained(folder), text_to_video_zero_pipeline(*refs)
    embeds, negative = torch.randn(2, 1, 77, 32, generator=seeded(8))
    encode = ref.encode_prompt
    ref.encode_prompt = lambda prompt, device, n, guidance, negative_prompt=None: encode(
        None, device, n, guidance, prompt_embeds=embeds, negative_prompt_embeds=negative)
    common = dict(height=32, width=32, num_inference_steps=6, t0=2, t1=3, guidance_scale=5.0)
    frames = ours(prompt_embeds=embeds, negative_prompt_embeds=negative, num_frames=2, ddpm_marginal="reference",
                  generator=seeded(9), progress=False, **common)
    out = ref("unused: the embeddings replace it", video_length=2, generator=seeded(9), **common).images
    assert_parity(frames, torch.from_numpy(np.asarray(out)))
    assert not torch.equal(frames, ours(prompt_embeds=negative, negative_prompt_embeds=embeds, num_frames=2,
                                        ddpm_marginal="reference", generator=seeded(9), progress=False, **common))


@torch.no_grad()
def test_control_video_embeds_equal_text(tiny, tmp_path):
    sd, _, folder = tiny
    torch.manual_seed(0)
    cn = write_controlnet_folder(tmp_path / "cn", ControlNet(TINY_CONTROLNET).state_dict(),
                                 {"controlnet": dataclasses.asdict(TINY_CONTROLNET)})
    pipe = ControlVideo.from_pretrained(folder, controlnet=cn)
    maps = frames(2, seed=0)
    prompts = ["a dancer", "a robot"]
    kwargs = dict(control=maps, num_inference_steps=3, num_videos_per_prompt=2, progress=False)
    text = pipe(prompts, negative_prompt=NEGATIVE, generator=seeded(5), **kwargs)
    assert text.shape == (4, 2, 32, 32, 3)
    embeds = pipe(prompt_embeds=pipe.sd.text_encoder(prompts),
                  negative_prompt_embeds=pipe.sd.text_encoder([NEGATIVE, NEGATIVE]), generator=seeded(5), **kwargs)
    assert torch.equal(text, embeds)
    one = dict(kwargs, num_videos_per_prompt=1, guidance_scale=1.0)
    assert torch.equal(pipe(prompts[0], generator=seeded(5), **one),
                       pipe(prompt_embeds=pipe.sd.text_encoder(prompts[:1]), generator=seeded(5), **one))
    with pytest.raises(ValueError, match="no control: give control="):  # both keywords are optional now
        pipe(prompt_embeds=pipe.sd.text_encoder(prompts[:1]))


@pytest.fixture(scope="module")
def ip2p(tmp_path_factory):
    folder, _ = tiny_instruct_pix2pix_folder(tmp_path_factory.mktemp("m") / "ip2p")
    return VideoInstructPix2Pix.from_pretrained(folder)


@torch.no_grad()
@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["uncond-empty", "negative"])
def test_instruct_pix2pix_embeds_equal_text(ip2p, negative):
    encode = ip2p.sd.text_encoder
    kwargs = dict(video=frames(2, seed=1), latents=torch.randn(2, 4, 16, 16, generator=seeded(6)),
                  num_inference_steps=3, progress=False)
    text = ip2p("make it snowy", negative_prompt=negative, **kwargs)
    embeds = ip2p(prompt_embeds=encode(["make it snowy"]),
                  negative_prompt_embeds=None if negative is None else encode([negative]), **kwargs)
    assert torch.equal(text, embeds)
    with pytest.raises(ValueError, match=r"prompt_embeds of shape \(2, 77, 32\) for a pipeline that takes one "):
        ip2p(prompt_embeds=encode(["a", "b"]), **kwargs)
    with pytest.raises(ValueError, match="give instruction or prompt_embeds, not both"):
        ip2p("make it snowy", prompt_embeds=encode(["a"]), **kwargs)
    with pytest.raises(ValueError, match="no video: give video="):  # both keywords are optional now
        ip2p(prompt_embeds=encode(["a"]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="a cat", prompt_embeds=torch.zeros(1, 77, 64)), r"give prompt or prompt_embeds, not both"),
        (dict(), r"no prompt: give prompt \(text\) or prompt_embeds \(b, n_tokens, 64\)"),
        (dict(prompt_embeds=torch.zeros(1, 77, 32)), r"prompt_embeds of shape \(1, 77, 32\), expected \(b, n_tokens, "
                                                     r"64\): 64 is the UNet's cross_attention_dim"),
        (dict(prompt_embeds=torch.zeros(77, 64)), r"prompt_embeds of shape \(77, 64\), expected \(b, n_tokens, 64\)"),
        (dict(prompt_embeds=[[0.0] * 64]), r"prompt_embeds must be a tensor \(b, n_tokens, 64\), got list"),
        (dict(prompt_embeds=torch.zeros(2, 77, 64), negative_prompt_embeds=torch.zeros(1, 77, 64)),
         r"negative_prompt_embeds of shape \(1, 77, 64\), expected \(2, 77, 64\)"),
        (dict(prompt="a cat", negative_prompt_embeds=torch.zeros(1, 10, 64)),
         r"negative_prompt_embeds of shape \(1, 10, 64\), expected \(1, 77, 64\)"),
        (dict(prompt_embeds=torch.zeros(1, 77, 64), negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 77, 64)),
         r"give negative_prompt or negative_prompt_embeds, not both"),
        (dict(prompt_embeds=torch.zeros(1, 10, 64)), r"prompt_embeds of shape \(1, 10, 64\) have 10 tokens but the "
                                                     r"unconditional branch encoded from text has 77"),
        (dict(prompt_embeds=torch.zeros(2, 77, 64), negative_prompt=["a", "b", "c"]), r"3 negative prompts for 2"),
    ],
    ids=["both", "neither", "wrong-width", "two-axes", "not-a-tensor", "negative-shape", "negative-for-text",
         "both-negatives", "token-count", "negative-count"],
)
def test_refusals(toy, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        toy(**kwargs, **VIDEO)
    assert "\n" not in str(info.value)


def test_text_to_image_refusals(tiny):
    sd, _, _ = tiny
    with pytest.raises(ValueError, match=r"prompt_embeds of shape \(2, 77, 32\) for a pipeline that takes one"):
        t2vz.text_to_image(sd, prompt_embeds=torch.zeros(2, 77, 32), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="no prompt: give prompt"):
        t2vz.text_to_image(sd, num_inference_steps=1, progress=False)

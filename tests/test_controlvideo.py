"""ControlVideo (conditional Text2Video-Zero) against diffusers' StableDiffusionControlNetPipeline with its
CrossFrameAttnProcessor on the UNet and the ControlNet and one x_T repeated over the frames (the recipe of diffusers'
Text2Video-Zero docs): same weights, same latents → same frames, fp32, tolerance conftest.PARITY_RTOL.
Then what the reference lacks: chunks, several videos, bad input."""
import dataclasses
import sys

import pytest
import torch
from conftest import assert_parity
from reference_models import TINY_UNET, diffusers_controlnet, sd15_ddim_scheduler, tiny_reference_folder

from t2vz import ControlNetConfig
from t2vz.method.controlvideo import ControlVideo
from t2vz.sd.model_folder import ModelFolderError, write_controlnet_folder
from t2vz.video_io import VideoIOError, write_video

# The tiny VAE downsamples by 2, so the tiny ControlNet's control embedding does too (one stride-2 conv).
TINY_CONTROLNET = ControlNetConfig.from_unet(TINY_UNET, conditioning_embedding_out_channels=(8, 16))
F, H, W = 4, 32, 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    folder, (unet, vae, clip) = tiny_reference_folder(root / "tiny")
    ref_cn = diffusers_controlnet(TINY_CONTROLNET, seed=5)
    cn_folder = write_controlnet_folder(root / "cn", ref_cn.state_dict(),
                                        {"controlnet": dataclasses.asdict(TINY_CONTROLNET)})
    return ControlVideo.from_pretrained(folder, controlnet=cn_folder), (unet, vae, clip, ref_cn), folder


def control_maps(f=F, h=H, w=W, seed=0) -> torch.Tensor:
    """Smooth, different control maps per frame (f, h, w, 3) in [0, 1]: a bright square moving right."""
    maps = torch.zeros(f, h, w, 3)
    for k in range(f):
        maps[k, h // 4 : h // 2, 4 + 4 * k : 16 + 4 * k] = 1.0
    return (maps + 0.1 * torch.rand(f, h, w, 3, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


def reference_frames(refs, prompt, maps, x_T, steps, guidance_scale=7.5, scale=1.0, negative_prompt=None):
    from diffusers import StableDiffusionControlNetPipeline, TextToVideoZeroPipeline

    from t2vz.sd.text_encoder import load_tokenizer

    CrossFrameAttnProcessor = sys.modules[TextToVideoZeroPipeline.__module__].CrossFrameAttnProcessor
    unet, vae, clip, cn = refs
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=clip, tokenizer=load_tokenizer(), unet=unet, controlnet=cn,
        scheduler=sd15_ddim_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    f = maps.shape[0]
    branches = 2 if guidance_scale > 1 else 1
    pipe.unet.set_attn_processor(CrossFrameAttnProcessor(batch_size=branches))
    pipe.controlnet.set_attn_processor(CrossFrameAttnProcessor(batch_size=branches))
    out = pipe(prompt=[prompt] * f, image=maps.permute(0, 3, 1, 2), latents=x_T.repeat(f, 1, 1, 1),
               num_inference_steps=steps, guidance_scale=guidance_scale, controlnet_conditioning_scale=scale,
               negative_prompt=None if negative_prompt is None else [negative_prompt] * f,
               height=maps.shape[1], width=maps.shape[2], output_type="pt").images
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("kwargs", [dict(), dict(guidance_scale=3.0, scale=0.6, negative_prompt="blurry")],
                         ids=["defaults", "guidance3-scale0.6-negative"])
@torch.no_grad()
def test_matches_diffusers_controlnet_pipeline_with_cross_frame_attention(tiny, kwargs):
    pipe, refs, _ = tiny
    maps = control_maps()
    x_T = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    ours = pipe("a dancing robot", control=maps, num_inference_steps=4, latents=x_T, progress=False,
                guidance_scale=kwargs.get("guidance_scale", 7.5), negative_prompt=kwargs.get("negative_prompt"),
                controlnet_conditioning_scale=kwargs.get("scale", 1.0))
    ref = reference_frames(refs, "a dancing robot", maps, x_T, 4, **kwargs)
    assert ours.shape == (F, H, W, 3)
    assert_parity(ours, ref)
    assert not torch.allclose(ours[0], ours[-1], atol=1e-3)  # the control maps move the frames


@torch.no_grad()
def test_seeded_noise_is_one_draw_repeated_over_frames(tiny):
    """x_T is the generator's first draw, (1, 4, h, w), the same for every frame (docs/method.md, Sec. 3.4)."""
    pipe, _, _ = tiny
    seen = []
    common = dict(control=control_maps(), num_inference_steps=2, progress=False)
    pipe("a cat", generator=torch.Generator().manual_seed(9), callback=lambda i, t, x: seen.append(x), **common)
    x_T = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(9))
    explicit = pipe("a cat", latents=x_T, **common)
    assert_parity(pipe("a cat", generator=torch.Generator().manual_seed(9), **common), explicit)
    assert seen[0].shape == (F, 4, H // 2, W // 2)


@torch.no_grad()
def test_cross_frame_attention_and_control_both_matter(tiny):
    """Compared on the final latents (the tiny random VAE decodes small latent differences to smaller ones)."""
    pipe, _, _ = tiny
    x_T = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(1))

    def final_latents(**kwargs):
        seen = []
        pipe("a cat", control=control_maps(), num_inference_steps=3, progress=False, latents=x_T,
             callback=lambda i, t, x: seen.append(x), **kwargs)
        return seen[-1]

    first, off = final_latents(), final_latents(cross_frame="off")
    torch.testing.assert_close(first[0], off[0], rtol=1e-5, atol=1e-5)  # frame 1 attends to itself either way
    assert (first[1:] - off[1:]).abs().max() > 1e-4  # 10× the frame-1 tolerance: a real difference
    no_control = final_latents(controlnet_conditioning_scale=0.0)
    assert (first - no_control).abs().max() > 1e-4
    # with the control scaled to 0 every frame sees the same x_T and attends to frame 1: all frames are frame 1
    torch.testing.assert_close(no_control[1:], no_control[:1].expand(F - 1, -1, -1, -1), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_chunked_equals_unchunked_and_batches(tiny):
    pipe, _, _ = tiny
    maps = control_maps(f=7, seed=2)
    common = dict(control=maps, num_inference_steps=3, progress=False)
    full = pipe("a cat", generator=torch.Generator().manual_seed(4), **common)
    for chunk_size in (2, 3, 5):
        chunked = pipe("a cat", generator=torch.Generator().manual_seed(4), chunk_size=chunk_size, **common)
        assert_parity(chunked, full)
    both = pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(4), **common)
    assert both.shape == (2, 7, H, W, 3)
    assert_parity(both[0], full)  # the first video's x_T is the first draw: the same as alone


@torch.no_grad()
def test_control_from_video_file_folder_and_uint8(tiny, tmp_path):
    pipe, _, _ = tiny
    maps = control_maps()
    uint8 = (maps * 255).round().to(torch.uint8)
    common = dict(num_inference_steps=2, progress=False, latents=torch.zeros(1, 4, H // 2, W // 2))
    from_array = pipe("a cat", control=uint8.numpy(), **common)
    assert_parity(pipe("a cat", control=uint8.float() / 255, **common), from_array)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    import imageio.v3 as iio
    for k, frame in enumerate(uint8.numpy()):
        iio.imwrite(frames_dir / f"{k:04d}.png", frame)
    assert_parity(pipe("a cat", control=frames_dir, **common), from_array)  # png is lossless
    gif = write_video(tmp_path / "control.gif", maps)
    assert pipe("a cat", control=gif, **common).shape == (F, H, W, 3)
    resized = pipe("a cat", control=maps, resolution=24, num_inference_steps=2, progress=False)
    assert resized.shape == (F, 16, 24, 3)  # 32×48 → long side 24, each side a multiple of 8


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_frames=5), ValueError, r"num_frames=5 but the control video has 4 frames"),
        (dict(height=64), ValueError, r"height=64 but the control maps are 32×48"),
        (dict(width=32), ValueError, r"width=32 but the control maps are 32×48"),
        (dict(control=torch.rand(4, 33, 48, 3)), ValueError, r"control maps of 33×48: height=33 must be a "),
        (dict(control=torch.rand(4, 32, 48)), ValueError, r"control: frames must have shape \(F, H, W, 3\)"),
        (dict(control=torch.rand(4, 32, 48, 3) * 2), ValueError, r"control holds floats outside \[0, 1\]"),
        (dict(control="missing.mp4"), VideoIOError, r"cannot read missing.mp4: no such file"),
        (dict(latents=torch.zeros(4, 4, 16, 24)), ValueError, r"latents have shape \(4, 4, 16, 24\), expected"),
        (dict(cross_frame="all"), ValueError, r"cross_frame='all' is not one of"),
        (dict(chunk_size=1), ValueError, r"chunk_size=1 must be an integer >= 2"),
        (dict(controlnet_conditioning_scale=float("nan")), ValueError, r"controlnet_conditioning_scale=nan"),
    ],
)
def test_bad_input_names_the_value(tiny, kwargs, error, match):
    pipe, _, _ = tiny
    args = {**dict(control=control_maps(), num_inference_steps=2, progress=False), **kwargs}
    with pytest.raises(error, match=match):
        pipe("a cat", **args)


def test_unreadable_video_is_a_clear_error(tiny, tmp_path):
    pipe, _, _ = tiny
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(VideoIOError, match="cannot read .*broken.mp4"):
        pipe("a cat", control=broken, num_inference_steps=2, progress=False)


def test_controlnet_for_another_base_model_is_refused(tiny, tmp_path):
    """A ControlNet whose encoder does not match the UNet (here: SD 2.x's 1024-wide text) is refused on load."""
    _, _, folder = tiny
    sd2_like = dataclasses.replace(TINY_CONTROLNET, cross_attention_dim=1024)
    cn = diffusers_controlnet(sd2_like, seed=1)
    cn_folder = write_controlnet_folder(tmp_path / "cn2", cn.state_dict(), {"controlnet": dataclasses.asdict(sd2_like)})
    with pytest.raises(ModelFolderError, match=r"cross_attention_dim 1024 vs 32 .*SD 2.x.*made for SD 1.5"):
        ControlVideo.from_pretrained(folder, controlnet=cn_folder)
    wrong_scale = ControlNetConfig.from_unet(TINY_UNET)  # embeds at 1/8 but the tiny VAE downsamples by 2
    cn = diffusers_controlnet(wrong_scale, seed=1)
    cn_folder = write_controlnet_folder(tmp_path / "cn8", cn.state_dict(),
                                        {"controlnet": dataclasses.asdict(wrong_scale)})
    with pytest.raises(ModelFolderError, match=r"1/8 scale but the VAE downsamples by 2"):
        ControlVideo.from_pretrained(folder, controlnet=cn_folder)



@torch.no_grad()
def test_fast_modes(tiny):
    """Token merging and feature caching act on the UNet: the defaults are the exact path bit for bit, each mode
    changes the frames, and chunked still equals unchunked."""
    pipe, _, _ = tiny
    common = dict(control=control_maps(f=5, seed=3), num_inference_steps=4, progress=False)
    exact = pipe("a cat", generator=torch.Generator().manual_seed(2), **common)
    same = pipe("a cat", generator=torch.Generator().manual_seed(2), merging_ratio=0.0, cache_interval=1, **common)
    assert torch.equal(same, exact)
    for mode in (dict(merging_ratio=0.5), dict(cache_interval=2, cache_branch=1)):
        fast = pipe("a cat", generator=torch.Generator().manual_seed(2), **mode, **common)
        assert not torch.equal(fast, exact), mode
        chunked = pipe("a cat", generator=torch.Generator().manual_seed(2), chunk_size=2, **mode, **common)
        assert_parity(chunked, fast)
    with pytest.raises(ValueError, match="cache_branch=99 is out of range"):
        pipe("a cat", cache_interval=2, cache_branch=99, **common)

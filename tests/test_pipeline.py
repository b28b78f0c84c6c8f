"""TextToVideoZero against diffusers' TextToVideoZeroPipeline (same weights, same seed → same frames, fp32,
tolerance conftest.PARITY_RTOL), and the behaviours the reference lacks (several prompts, guidance ≤ 1, chunks)."""
import numpy as np
import pytest
import torch
from conftest import assert_parity
from reference_models import (
    SD15_CLIP, SD15_UNET, SD15_VAE, clip_text_model, diffusers_unet, diffusers_vae, text_to_video_zero_pipeline,
    tiny_reference_folder, write_t2vz_folder,
)

from t2vz import TextToVideoZero
from t2vz.sd.model_folder import ModelFolderError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, refs = tiny_reference_folder(tmp_path_factory.mktemp("m") / "tiny")
    return TextToVideoZero.from_pretrained(folder), text_to_video_zero_pipeline(*refs)


def reference_frames(pipe, prompt, seed, num_frames, motion_strength=12.0, direction=(1.0, 1.0), **kwargs):
    out = pipe(prompt, video_length=num_frames, generator=torch.Generator().manual_seed(seed),
               motion_field_strength_x=motion_strength * direction[0],
               motion_field_strength_y=motion_strength * direction[1], **kwargs).images
    return torch.from_numpy(np.asarray(out))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # the reference's defaults: 50 steps, t0=44, t1=47, λ=12, δ=(1, 1), guidance 7.5
        dict(num_inference_steps=20, t0=10, t1=15, motion_strength=40.0, direction=(-1.0, 0.5), height=32, width=48),
        dict(num_inference_steps=12, t0=3, t1=4, motion_strength=7.0, guidance_scale=3.0, negative_prompt="blurry"),
        dict(num_inference_steps=10, t0=3, t1=3, motion_strength=64.0),  # Δt = 0: warp at T1, no re-noising
    ],
    ids=["defaults", "non-default-motion-non-square", "dt1-negative", "dt0"],
)
@torch.no_grad()
def test_seed_compatible_with_diffusers(tiny, kwargs):
    assert_seed_compatible(*tiny, {"height": 32, "width": 32, **kwargs})


def assert_seed_compatible(ours_pipe, ref_pipe, kwargs: dict) -> None:
    """Our frames and the reference pipeline's for one prompt, seed 7, 4 frames and `kwargs` (our option names;
    the reference takes λ·δ as its motion field strengths) are equal within the parity tolerance, and move."""
    kwargs = dict(kwargs)
    ours = ours_pipe("a horse galloping", num_frames=4, ddpm_marginal="reference", progress=False,
                     generator=torch.Generator().manual_seed(7), **kwargs)
    motion = {k: kwargs.pop(k) for k in ("motion_strength", "direction") if k in kwargs}
    ref = reference_frames(ref_pipe, "a horse galloping", 7, 4, **motion, **kwargs)
    assert ours.shape == (4, kwargs["height"], kwargs["width"], 3)
    assert_parity(ours, ref)
    assert not torch.allclose(ours[0], ours[-1])  # frames differ: motion is not a no-op


@torch.no_grad()
def test_exact_marginal_differs_from_reference_marginal(tiny):
    pipe, _ = tiny
    common = dict(num_frames=3, height=32, width=32, num_inference_steps=10, t0=2, t1=5, progress=False)
    exact = pipe("a cat", generator=torch.Generator().manual_seed(1), **common)
    ref = pipe("a cat", generator=torch.Generator().manual_seed(1), ddpm_marginal="reference", **common)
    torch.testing.assert_close(exact[0], ref[0])  # frame 1 never goes through the forward process
    assert not torch.allclose(exact[1:], ref[1:])


@torch.no_grad()
def test_several_prompts_and_videos_and_no_guidance(tiny):
    """Each video of a batch equals the same video generated alone (the reference hard-codes batch 2)."""
    pipe, _ = tiny
    common = dict(num_frames=3, height=32, width=32, num_inference_steps=8, t0=1, t1=3, progress=False)
    for guidance in (7.5, 1.0):
        both = pipe(["a cat", "a dog"], guidance_scale=guidance, latents=torch.randn(2, 4, 16, 16,
                    generator=torch.Generator().manual_seed(3)), **common)
        assert both.shape == (2, 3, 32, 32, 3)
        x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        for i, prompt in enumerate(["a cat", "a dog"]):
            # the forward-process noise for video i is drawn in one batch: give the same stream by seeding alike
            alone = pipe(prompt, guidance_scale=guidance, latents=x_T[i : i + 1], **common)
            assert_parity(alone[0], both[i, 0])  # frame 1 depends only on its own noise
    two = pipe("a cat", num_videos_per_prompt=2, generator=torch.Generator().manual_seed(0), **common)
    assert two.shape == (2, 3, 32, 32, 3) and not torch.allclose(two[0], two[1])


@torch.no_grad()
def test_without_motion_dynamics_frame_one_is_the_text_to_image_result(tiny):
    """motion_dynamics=False (the paper's ablation): independent x_T per frame, all denoised from T; frame 1
    attends only to itself, so it is exactly the image text_to_image makes from the same x_T."""
    from t2vz import text_to_image

    pipe, _ = tiny
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    frames = pipe("a cat", num_frames=3, height=32, width=32, num_inference_steps=8, t0=1, t1=3, latents=x_T,
                  motion_dynamics=False, generator=torch.Generator().manual_seed(9), progress=False)
    image = text_to_image(pipe.sd, "a cat", 32, 32, 8, latents=x_T, progress=False)
    assert_parity(frames[0], image)
    assert not torch.allclose(frames[1], frames[2])


@torch.no_grad()
def test_chunked_equals_unchunked(tiny):
    pipe, _ = tiny
    common = dict(num_frames=7, height=32, width=32, num_inference_steps=8, t0=1, t1=3, progress=False)
    full = pipe("a cat", generator=torch.Generator().manual_seed(5), **common)
    for chunk_size in (2, 3, 4):
        chunked = pipe("a cat", generator=torch.Generator().manual_seed(5), chunk_size=chunk_size, **common)
        assert_parity(chunked, full)


@torch.no_grad()
def test_chunks_run_frame_1_once_per_step(tiny):
    """48 frames in chunks of 8: the UNet sees every frame once per video-pass step (frame 1's keys and values are
    shared with the later chunks, not recomputed), 6 calls a step, with the frames of one unchunked pass."""
    pipe, _ = tiny
    common = dict(num_frames=48, height=16, width=16, num_inference_steps=4, t0=1, t1=1, eta=0.5, progress=False)
    full = pipe("a cat", generator=torch.Generator().manual_seed(5), **common)
    rows = []
    handle = pipe.sd.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        chunked = pipe("a cat", generator=torch.Generator().manual_seed(5), chunk_size=8, **common)
    finally:
        handle.remove()
    assert_parity(chunked, full)  # η > 0 too: the DDIM noise is drawn for all frames at once either way
    video_pass = rows[-2 * 6:]  # steps 2 (T₁) and 1, after frame 1's 2 steps alone
    assert rows[:2] == [2, 2]  # frame 1 alone, both guidance branches
    assert video_pass == [2 * 8] * 12 and len(rows) == 2 + 2 * 6  # 48 frames = 6 chunks of 8, once per step


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=35), "height=35 must be a positive multiple of 2"),
        (dict(num_frames=0), "num_frames=0 must be an integer >= 1"),
        (dict(t0=6, t1=5), "t0=6 must not exceed t1=5"),
        (dict(t0=2, t1=12), "t1=12 is out of range for 10 DDIM steps"),
        (dict(motion_strength=float("nan")), "motion_strength .* finite number, got nan"),
        (dict(cross_frame="all"), "cross_frame='all' is not one of"),
        (dict(ddpm_marginal="approx"), "ddpm_marginal='approx'"),
        (dict(chunk_size=1), "chunk_size=1 must be an integer >= 2"),
        (dict(cross_frame_levels=[0, 2]), r"cross_frame_levels=\[0, 2\]: this UNet has levels 0..1"),
        (dict(cross_frame_levels=[0], cross_frame="off"), "needs cross-frame attention, but cross_frame='off'"),
        (dict(cross_frame_levels=[]), r"cross_frame_levels=\[\] must be distinct UNet levels"),
    ],
)
def test_bad_input_names_the_value(tiny, kwargs, match):
    pipe, _ = tiny
    args = {**dict(num_frames=3, height=32, width=32, num_inference_steps=10, t0=2, t1=5, progress=False), **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe("a cat", **args)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist; convert a checkpoint first"):
        TextToVideoZero.from_pretrained(tmp_path / "nope")


@pytest.mark.full
@torch.no_grad()
def test_sd15_shapes_seed_compatible_with_diffusers(tmp_path):
    """Full SD 1.5 shapes (UNet, VAE, CLIP ViT-L/14), 64×64, 4 frames, 10 steps, t0=2, t1=5."""
    refs = diffusers_unet(SD15_UNET), diffusers_vae(SD15_VAE), clip_text_model(SD15_CLIP)
    ours_pipe = TextToVideoZero.from_pretrained(
        write_t2vz_folder(tmp_path / "sd15", SD15_UNET, SD15_VAE, SD15_CLIP, *refs))
    kwargs = dict(height=64, width=64, num_inference_steps=10, t0=2, t1=5)
    ours = ours_pipe("a horse galloping on the street", num_frames=4, ddpm_marginal="reference", progress=False,
                     generator=torch.Generator().manual_seed(0), **kwargs)
    ref = reference_frames(text_to_video_zero_pipeline(*refs), "a horse galloping on the street", 0, 4, **kwargs)
    assert_parity(ours, ref)

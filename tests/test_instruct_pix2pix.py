"""VideoInstructPix2Pix against diffusers' StableDiffusionInstructPix2PixPipeline with CrossFrameAttnProcessor(
batch_size=3) (same weights, source frames and latents → same frames, fp32, tolerance conftest.PARITY_RTOL), and
what the reference lacks: chunks, video files, resizing, input checks."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_parity
from reference_models import (
    TINY_CLIP, TINY_UNET, TINY_VAE, clip_text_model, diffusers_unet, diffusers_vae, instruct_pix2pix_pipeline,
    tiny_instruct_pix2pix_folder, write_t2vz_folder,
)

from t2vz.method.instruct import VideoInstructPix2Pix, source_size
from t2vz.video_io import VideoIOError, resized_shape, write_video

INSTRUCTION = "make it snowy"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, refs = tiny_instruct_pix2pix_folder(tmp_path_factory.mktemp("m") / "ip2p")
    return VideoInstructPix2Pix.from_pretrained(folder), instruct_pix2pix_pipeline(*refs)


def smooth_frames(f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random but smooth frames (f, h, w, 3) in [0, 1]: coarse noise upsampled bilinearly."""
    coarse = torch.rand(f, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def noise(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "size, kwargs",
    [((32, 32), dict()),
     ((32, 48), dict(guidance_scale=3.0, image_guidance_scale=1.2, negative_prompt="blurry", num_inference_steps=3))],
    ids=["defaults", "non-square-other-scales-negative"],
)
@torch.no_grad()
def test_parity_with_diffusers(tiny, size, kwargs):
    """diffusers' image processor maps a float tensor (F, 3, H, W) in [0, 1] to [−1, 1] and takes H, W from it."""
    ours_pipe, ref_pipe = tiny
    kwargs = {"num_inference_steps": 4, **kwargs}
    frames = smooth_frames(4, *size)
    x_T = noise((4, 4, size[0] // 2, size[1] // 2), seed=3)  # the tiny VAE downsamples by 2
    ours = ours_pipe(INSTRUCTION, video=frames, latents=x_T, progress=False, **kwargs)
    negative = kwargs.pop("negative_prompt", None)
    ref = ref_pipe([INSTRUCTION] * 4, image=frames.permute(0, 3, 1, 2), latents=x_T, output_type="pt",
                   negative_prompt=None if negative is None else [negative] * 4, **kwargs).images
    assert ours.shape == (4, *size, 3)
    assert_parity(ours, ref.permute(0, 2, 3, 1))


@torch.no_grad()
def test_seeded_noise_matches_diffusers(tiny):
    """Without `latents`, the noise is one (F, 4, h, w) draw from the generator, as diffusers' prepare_latents."""
    ours_pipe, ref_pipe = tiny
    frames = smooth_frames(3, 32, 48, seed=1)
    ours = ours_pipe(INSTRUCTION, video=frames, num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                     progress=False)
    ref = ref_pipe([INSTRUCTION] * 3, image=frames.permute(0, 3, 1, 2), num_inference_steps=2, output_type="pt",
                   generator=torch.Generator().manual_seed(5)).images
    assert_parity(ours, ref.permute(0, 2, 3, 1))


@torch.no_grad()
def test_chunks_equal_unchunked(tiny):
    pipe, _ = tiny
    frames, x_T = smooth_frames(5, 32, 32, seed=2), noise((5, 4, 16, 16), seed=4)
    common = dict(video=frames, latents=x_T, num_inference_steps=3, progress=False)
    whole = pipe(INSTRUCTION, **common)
    steps = []
    chunked = pipe(INSTRUCTION, chunk_size=3, callback=lambda i, t, x: steps.append((i, x.shape[0])), **common)
    assert chunked.shape == whole.shape == (5, 32, 32, 3)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert steps == [(i, 5) for i in range(3)]  # chunks [0, 1, 2], [3, 4]; the callback sees every frame once a step


@torch.no_grad()
def test_cross_frame_attention_is_applied(tiny):
    pipe, _ = tiny
    frames, x_T = smooth_frames(3, 32, 32, seed=5), noise((3, 4, 16, 16), seed=6)
    common = dict(video=frames, latents=x_T, num_inference_steps=2, progress=False)
    first, off = pipe(INSTRUCTION, **common), pipe(INSTRUCTION, cross_frame="off", **common)
    torch.testing.assert_close(first[0], off[0])  # frame 1 attends to itself either way
    assert not torch.allclose(first[1:], off[1:], atol=1e-4)
    assert not torch.allclose(first[0], first[1], atol=1e-3)  # different sources and noise → different frames


def test_refuses_a_plain_model(tmp_path):
    refs = diffusers_unet(TINY_UNET), diffusers_vae(TINY_VAE), clip_text_model(TINY_CLIP)
    folder = write_t2vz_folder(tmp_path / "plain", TINY_UNET, TINY_VAE, TINY_CLIP, *refs)
    with pytest.raises(ValueError, match=r"in_channels=4.*weights_convert"):
        VideoInstructPix2Pix.from_pretrained(folder)


@pytest.mark.parametrize("suffix", ["mp4", "gif"])
@torch.no_grad()
def test_video_file_and_resizing(tiny, tmp_path, suffix):
    pipe, _ = tiny
    path = write_video(tmp_path / f"source.{suffix}", smooth_frames(3, 100, 60, seed=7))
    common = dict(video=path, num_inference_steps=1, guidance_scale=2.0, progress=False)
    for multiple in (8, 64):
        expected = resized_shape(100, 60, 64, multiple)
        assert expected == {8: (64, 40), 64: (64, 64)}[multiple]
        out = pipe(INSTRUCTION, resolution=64, size_multiple=multiple, num_frames=2, **common)
        assert out.shape == (2, *expected, 3) and 0 <= out.min() and out.max() <= 1


def test_source_size_rule():
    assert source_size(100, 60, None, 64, 8) == resized_shape(100, 60, 100, 64) == (128, 64)  # not multiples of 8
    assert source_size(96, 64, None, 64, 8) == (96, 64)  # kept
    assert source_size(100, 60, None, 64, 2) == (100, 60)  # the tiny VAE downsamples by 2
    assert source_size(96, 64, 128, 8, 8) == (128, 88)


@torch.no_grad()
def test_resolution_none_resizes_sizes_the_vae_cannot_take(tiny):
    pipe, _ = tiny
    out = pipe(INSTRUCTION, video=smooth_frames(2, 33, 20), size_multiple=8, num_inference_steps=1, progress=False)
    assert out.shape == (2, *resized_shape(33, 20, 33, 8), 3)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(video="/nonexistent/clip.mp4"), VideoIOError, r"/nonexistent/clip\.mp4"),
        (dict(num_frames=5), ValueError, r"num_frames=5.*only 2 frames"),
        (dict(latents=torch.zeros(2, 4, 8, 8)), ValueError, r"\(2, 4, 8, 8\).*expected \(2, 4, 16, 16\)"),
        (dict(guidance_scale=-1.0), ValueError, r"guidance_scale=-1\.0"),
        (dict(image_guidance_scale=float("nan")), ValueError, r"image_guidance_scale=nan"),
        (dict(cross_frame="last"), ValueError, r"cross_frame='last'"),
        (dict(chunk_size=1), ValueError, r"chunk_size=1"),
        (dict(instruction=[]), ValueError, r"instruction.*\[\]"),
        (dict(instruction=["a", "b"]), ValueError, r"one string.*\['a', 'b'\]"),
        (dict(negative_prompt=3), ValueError, r"negative_prompt.*3"),
        (dict(num_frames=0), ValueError, r"num_frames=0"),
        (dict(resolution=-64), ValueError, r"resolution=-64"),
        (dict(size_multiple=7), ValueError, r"size_multiple=7"),
        (dict(video=torch.full((2, 32, 32, 3), 2.0)), ValueError, r"video holds floats outside \[0, 1\]"),
        (dict(num_inference_steps=0), ValueError, r"num_inference_steps=0"),
    ],
    ids=lambda v: None if isinstance(v, dict) else "",
)
def test_bad_inputs(tiny, kwargs, error, message):
    pipe, _ = tiny
    kwargs = {"instruction": INSTRUCTION, "video": smooth_frames(2, 32, 32), "num_inference_steps": 1,
              "progress": False, **kwargs}
    with pytest.raises(error, match=message):
        pipe(kwargs.pop("instruction"), **kwargs)


@torch.no_grad()
def test_fast_modes(tiny):
    """Token merging and feature caching: the defaults are the exact path bit for bit, each mode changes the frames,
    and chunked still equals unchunked."""
    pipe, _ = tiny
    frames, x_T = smooth_frames(4, 32, 32, seed=5), noise((4, 4, 16, 16), seed=6)
    common = dict(video=frames, latents=x_T, num_inference_steps=4, progress=False)
    exact = pipe(INSTRUCTION, **common)
    assert torch.equal(pipe(INSTRUCTION, merging_ratio=0.0, cache_interval=1, **common), exact)
    for mode in (dict(merging_ratio=0.5, merging_options={"use_rand": False}), dict(cache_interval=3)):
        fast = pipe(INSTRUCTION, **mode, **common)
        assert not torch.equal(fast, exact), mode
        torch.testing.assert_close(pipe(INSTRUCTION, chunk_size=2, **mode, **common), fast, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merging_options has unknown key"):
        pipe(INSTRUCTION, merging_ratio=0.5, merging_options={"ratio": 0.2}, **common)

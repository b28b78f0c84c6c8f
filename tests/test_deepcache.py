"""DeepCache feature caching (t2vz/sd/deepcache.py, `UNet.forward(cache=...)`, `ddim_denoise(cache=...)`) against
DeepCache's own `DeepCacheSDHelper` on diffusers' UNet and pipelines (same weights, same seed; fp32, tolerance
conftest.PARITY_RTOL), and its invariants: interval 1 is the exact UNet, the deep layers do not run on a cached
call, chunked equals unchunked.

DeepCache's own Text2Video-Zero pipeline (DeepCache/sd/pipeline_text_to_video_zero.py) does not import under
diffusers 0.42.1 (its UNet imports `PositionNet`, since removed from diffusers.models.embeddings), so the video
oracle is diffusers' TextToVideoZeroPipeline with the helper.
"""
from __future__ import annotations

import functools
import re
import types

import pytest
import torch
from conftest import assert_parity
from reference_models import (
    SD15_UNET, TINY_UNET, diffusers_unet, stable_diffusion_pipeline, text_to_video_zero_pipeline,
    tiny_reference_folder,
)

import t2vz
import t2vz.method.text_to_image as t2vz_image
from t2vz import TextToVideoZero
from t2vz.method import sampling
from t2vz.method.chunks import chunk_caches, eps_by_chunks
from t2vz.sd.attention import CrossFrame
from t2vz.sd.deepcache import FeatureCache, branch_position, skip_count
from t2vz.sd.loading import build_loaded
from t2vz.sd.schedulers import DDIM
from t2vz.sd.unet import UNet, UNetConfig, run_encoder, timesteps_for

TINY_BRANCHES = range(skip_count(TINY_UNET))  # 0..5: 2 levels of 3 layers


@pytest.fixture(scope="module")
def unets():
    ref = diffusers_unet(TINY_UNET)
    return ref, build_loaded(UNet, TINY_UNET, ref.state_dict()).eval()


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder, refs = tiny_reference_folder(tmp_path_factory.mktemp("m") / "tiny")
    return TextToVideoZero.from_pretrained(folder), refs


def bare(unet, timesteps):
    """A diffusers UNet as the helper sees a pipeline: its step counter is the index of t in `timesteps`."""
    return types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(timesteps=torch.as_tensor(timesteps)))


def helper_on(pipe, interval: int, branch: int):
    """DeepCache's DeepCacheSDHelper enabled on `pipe` (a diffusers pipeline, or `bare`)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return helper


def inputs(seed: int, n: int = 2, size: int = 8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, generator=gen)
    return x, torch.randn(n, 77, TINY_UNET.cross_attention_dim, generator=gen)


def skips_of(unet: UNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The UNet's skips on x (n, c, h, w each, in encoder order): the shapes its down residuals take."""
    n = x.shape[0]
    temb = unet.time_embedding(timesteps_for(1, n, x.device), x.dtype)
    return run_encoder(unet, unet.conv_in(x), temb, torch.zeros(n, 77, unet.config.cross_attention_dim), None)[1]


# --------------------------------------------------------------------------------------------- the UNet call
@torch.no_grad()
def test_interval_1_is_the_exact_unet(unets):
    _, ours = unets
    x, context = inputs(0, n=6)
    residuals = [torch.randn_like(s) for s in skips_of(ours, x)], torch.randn(6, 64, 4, 4)
    for kwargs in (dict(), dict(cross_frame=CrossFrame(3)),
                   dict(down_residuals=residuals[0], mid_residual=residuals[1])):
        exact = ours(x, 981, context, **kwargs)
        for branch in TINY_BRANCHES:
            cache = FeatureCache(1, branch)
            for _ in range(3):
                assert torch.equal(ours(x, 981, context, cache=cache, **kwargs), exact)


@pytest.mark.parametrize("cfg", [
    TINY_UNET,
    UNetConfig(block_out_channels=(32, 32, 64), attention_levels=(False, True, True), layers_per_block=1,
               cross_attention_dim=32),
    UNetConfig(block_out_channels=(32, 64), attention_levels=(True, True), layers_per_block=3, cross_attention_dim=32),
], ids=["L2", "L1-3-levels", "L3"])
@torch.no_grad()
def test_cached_call_on_the_same_input_is_the_full_call(cfg):
    """Branch B recomputes exactly what a full pass computes there: on the input that made the cached feature, a
    cached call equals the full call, for every branch of UNets with 1, 2, 3 layers a level (odd latent size)."""
    unet = UNet(cfg).eval()
    x, context = torch.randn(2, 4, 9, 7), torch.randn(2, 77, 32)
    full = unet(x, 500, context)
    assert skip_count(cfg) == len(cfg.block_out_channels) * (cfg.layers_per_block + 1)
    for branch in range(skip_count(cfg)):
        cache = FeatureCache(2, branch)
        assert torch.equal(unet(x, 500, context, cache=cache), full)
        assert not cache.next_is_full()
        assert torch.equal(unet(x, 500, context, cache=cache), full), branch
        other = unet(x + 1, 500, context, cache=FeatureCache(2, branch))  # caches are independent
        assert not torch.equal(other, full)


@pytest.mark.parametrize("interval,branch", [(2, 0), (3, 1), (2, 2), (4, 3), (3, 4), (2, 5)])
@torch.no_grad()
def test_unet_calls_match_the_deepcache_helper(unets, interval, branch):
    """Five steps of one trajectory (new x and t each): every output equals the helper-wrapped diffusers UNet."""
    ref, ours = unets
    timesteps = [981, 781, 581, 381, 181]
    helper = helper_on(bare(ref, timesteps), interval, branch)
    cache = FeatureCache(interval, branch)
    try:
        for i, t in enumerate(timesteps):
            x, context = inputs(i)
            expected = ref(x, torch.tensor(t), context).sample
            assert_parity(ours(x, t, context, cache=cache), expected)
    finally:
        helper.disable()
    assert cache.calls == 5


@pytest.mark.parametrize("branch", [0, 2, 5])
@torch.no_grad()
def test_controlnet_residuals_match_the_deepcache_helper(unets, branch):
    """ControlNet residuals reach the skips a cached call computes; at the deepest branch (5: the mid block's
    output) the call's own mid residual is added to the cached, residual-free feature, as with the helper."""
    ref, ours = unets
    helper = helper_on(bare(ref, [981, 781, 581]), 3, branch)
    cache = FeatureCache(3, branch)
    try:
        for i, t in enumerate([981, 781, 581]):
            x, context = inputs(i)
            down, mid = [torch.randn_like(s) for s in skips_of(ours, x)], torch.randn(2, 64, 4, 4)
            expected = ref(x, torch.tensor(t), context, down_block_additional_residuals=tuple(down),
                           mid_block_additional_residual=mid).sample
            assert_parity(ours(x, t, context, cache=cache, down_residuals=down, mid_residual=mid), expected)
    finally:
        helper.disable()


def layers_run(unet: torch.nn.Module, call, names: set[str]) -> set[str]:
    """Those of the layers `names` (resnets, transformers, down/upsamplers, the mid block, conv_in, conv_out, ...)
    whose own computation ran during `call()`: those with a leaf module that was called (a layer the helper skips
    is called but returns its cached output without running its children)."""
    ran, hooks = set(), []
    for name, module in unet.named_modules():
        if not list(module.children()):
            layer = re.match(r"(mid_block|(down|up)_blocks\.\d+\.\w+\.\d+|\w+)", name).group(0)
            hooks.append(module.register_forward_hook(lambda m, a, out, layer=layer: ran.add(layer)))
    try:
        call()
    finally:
        for h in hooks:
            h.remove()
    return ran & names


@pytest.mark.parametrize("branch", TINY_BRANCHES)
@torch.no_grad()
def test_cached_call_runs_the_helpers_layers_and_no_deep_ones(unets, branch):
    """On a cached step exactly the layers the helper runs run (conv_in, the encoder layers that make skips 0..B,
    the decoder layers that consume them); the mid block and the deeper layers do not run at all."""
    ref, ours = unets
    x, context = inputs(0)
    cache = FeatureCache(2, branch)
    names = {name for name, _ in ours.named_modules()}  # diffusers' are these, and a few parameter-free ones
    ours_full = layers_run(ours, lambda: ours(x, 981, context, cache=cache), names)
    ours_cached = layers_run(ours, lambda: ours(x, 961, context, cache=cache), names)
    helper = helper_on(bare(ref, [981, 961]), 2, branch)
    try:
        ref_full = layers_run(ref, lambda: ref(x, torch.tensor(981), context), names)
        ref_cached = layers_run(ref, lambda: ref(x, torch.tensor(961), context), names)
    finally:
        helper.disable()
    assert ours_full == ref_full and "mid_block" in ours_full
    assert ours_cached == ref_cached
    assert "mid_block" not in ours_cached and {"conv_in", "conv_out"} <= ours_cached
    encoder = [s for s in ours_cached if s.startswith("down_blocks")]
    decoder = [s for s in ours_cached if s.startswith("up_blocks") and ".resnets." in s]
    assert len(encoder) == [0, 2, 4, 5, 6, 7][branch]  # the resnets, transformers, downsampler making skips 1..B
    assert len(decoder) == branch + 1  # the decoder layers consuming skips 0..B


@torch.no_grad()
def test_deep_blocks_run_once_per_interval_and_reset_restarts(unets):
    _, ours = unets
    calls = []
    hook = ours.mid_block.register_forward_hook(lambda *a: calls.append(1))
    cache = FeatureCache(3, 1)
    x, context = inputs(0)
    try:
        outs = [ours(x + i, 981 - i, context, cache=cache) for i in range(7)]
        assert len(calls) == 3  # calls 0, 3, 6
        cache.reset()
        assert cache.next_is_full() and cache.feature is None
        again = ours(x + 1, 980, context, cache=cache)  # after reset: a full pass
        assert len(calls) == 4
    finally:
        hook.remove()
    assert torch.equal(again, ours(x + 1, 980, context))
    assert not torch.equal(outs[1], ours(x + 1, 980, context))  # call 1 was a cached one


@torch.no_grad()
def test_a_batch_or_size_change_on_a_cached_call_is_refused(unets):
    _, ours = unets
    x, context = inputs(0)
    cache = FeatureCache(2, 0)
    ours(x, 981, context, cache=cache)
    with pytest.raises(ValueError, match=r"features for an input of shape \(2, 4, 8, 8\), but this UNet call has "
                                         r"shape \(4, 4, 8, 8\)"):
        ours(torch.cat([x, x]), 961, torch.cat([context, context]), cache=cache)
    with pytest.raises(ValueError, match=r"has shape \(2, 4, 16, 16\)"):
        ours(torch.randn(2, 4, 16, 16), 961, context, cache=cache)
    assert cache.calls == 1  # the refused calls were not counted: the next call is the cached one
    ours(x, 961, context, cache=cache)
    ours(torch.randn(2, 4, 16, 16), 941, context, cache=cache)  # a full call may take any shape


@pytest.mark.parametrize("args,match", [
    ((0,), r"cache_interval=0 must be an integer >= 1"),
    ((2.0,), r"cache_interval=2.0 must be an integer >= 1"),
    ((True,), r"cache_interval=True must be an integer >= 1"),
    ((2, -1), r"cache_branch=-1 must be an integer >= 0"),
    ((2, "0"), r"cache_branch='0' must be an integer >= 0"),
])
def test_bad_cache_settings_name_the_value(args, match):
    with pytest.raises(ValueError, match=match):
        FeatureCache(*args)
    with pytest.raises(ValueError, match=match):
        chunk_caches(args if len(args) == 2 else (*args, 0))


@torch.no_grad()
def test_branch_out_of_range_for_the_unet(unets):
    _, ours = unets
    x, context = inputs(0)
    with pytest.raises(ValueError, match=r"cache_branch=6 is out of range for this UNet: its branches are 0..5 "
                                         r"\(2 levels of 3 layers"):
        ours(x, 981, context, cache=FeatureCache(2, 6))


def test_branch_numbering_is_deepcaches():
    """DeepCache's cache_branch_id B is block B // 3, layer B % 3 for SD 1.5 (12 branches); L+1 for other L."""
    assert skip_count(SD15_UNET) == 12
    assert [branch_position(b, SD15_UNET) for b in (0, 1, 2, 3, 5, 11)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2),
                                                                           (3, 2)]
    three = UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), layers_per_block=3)
    assert skip_count(three) == 8 and branch_position(5, three) == (1, 1)
    with pytest.raises(ValueError, match="cache_branch=12 is out of range"):
        branch_position(12, SD15_UNET)


# ------------------------------------------------------------------------------------------ the denoising loop
def test_chunk_caches_one_per_chunk_for_the_loop():
    caches = chunk_caches((2, 1))
    first = caches([0, 1, 2])
    assert first is caches([0, 1, 2]) and first is not caches([3, 4]) and (first.interval, first.branch) == (2, 1)
    assert chunk_caches(None)([0]) is None and chunk_caches((1, 3))([0]) is None  # interval 1: nothing kept


@torch.no_grad()
def test_chunked_caches_stay_in_step_with_frame_1_replayed(unets):
    """Through `eps_by_chunks`, each chunk has its own cache; on a cached step no chunk runs the deep attention
    layers (the first records, the later replay frame 1's keys and values of the shallow ones only), and the
    chunked prediction equals the unchunked one at every step."""
    _, ours = unets
    f, context = 5, torch.randn(2, 77, 32)
    whole, chunked = chunk_caches((2, 1)), chunk_caches((2, 1))
    seen = []

    def predictor(caches):
        def predict_chunk(x, t, ids, frames):
            seen.append(caches(ids).next_is_full())
            return ours(x, t, context, cross_frame=frames, cache=caches(ids))
        return predict_chunk
    x = torch.randn(2 * f, 4, 8, 8)
    for i, t in enumerate([981, 961, 941]):
        expected = eps_by_chunks(predictor(whole), CrossFrame(f), None)(x + i, torch.tensor(t))
        seen.clear()
        assert_parity(eps_by_chunks(predictor(chunked), CrossFrame(f), 2)(x + i, torch.tensor(t)), expected)
        assert seen == [i % 2 == 0] * 3  # three chunks, all full or all cached


@pytest.mark.parametrize("interval,branch", [(2, 0), (3, 2), (4, 4), (5, 5)])
@torch.no_grad()
def test_text_to_image_matches_stable_diffusion_pipeline_with_the_helper(pipes, monkeypatch, interval, branch):
    """Text-to-image, 10 steps of one loop: the helper's step counter (the index of t from the first call) is ours."""
    ours, refs = pipes
    pipe = stable_diffusion_pipeline(*refs)
    helper = helper_on(pipe, interval, branch)  # its step counter reads the pipeline's scheduler
    try:
        expected = pipe("a cat", num_inference_steps=10, height=32, width=32, output_type="pt",
                        generator=torch.Generator().manual_seed(4)).images[0].permute(1, 2, 0)
    finally:
        helper.disable()
    monkeypatch.setattr(t2vz_image, "ddim_denoise", functools.partial(sampling.ddim_denoise, cache=(interval, branch)))
    image = t2vz.text_to_image(ours.sd, "a cat", 32, 32, 10, generator=torch.Generator().manual_seed(4),
                               progress=False)
    assert_parity(image, expected)
    monkeypatch.undo()
    plain = t2vz.text_to_image(ours.sd, "a cat", 32, 32, 10, generator=torch.Generator().manual_seed(4),
                               progress=False)
    assert not torch.allclose(image, plain, atol=1e-3)  # caching changed the image: the comparison is not vacuous


def video_with_cache(pipe, cache, **kwargs):
    """Our TextToVideoZero with every DDIM loop caching (its `cache_interval`, `cache_branch` keywords): one fresh
    cache per loop (per chunk)."""
    interval, branch = cache
    return pipe("a horse galloping", progress=False, cache_interval=interval, cache_branch=branch, **kwargs)


VIDEO = dict(num_frames=4, height=32, width=32, num_inference_steps=10, t0=2, t1=5, motion_strength=12.0)


@pytest.mark.parametrize("interval,branch", [(2, 0), (4, 3), (2, 5)])
@torch.no_grad()
def test_text_to_video_zero_matches_diffusers_with_the_helper_when_t1_is_a_full_step(
        pipes, interval, branch):
    """Ours restarts the cache with every DDIM loop: T → T₁ and T₁ → T₀ on frame 1, then T₁ → 0 on all frames
    (as DeepCache's own T2V-Zero pipeline, whose loops restart their step count). The helper counts the index
    of t in the 10-step schedule from its first call and never restarts. With 10 steps and t1 = 5, T₁ is
    index k = 4: for N | k both make full passes on the same indices (multiples of N) in every loop, so the videos
    are equal. For N ∤ k they differ from frame 1's T₁ → T₀ loop on (ours starts it on a full pass, the helper
    on a cached one), and the helper cannot run the video loop at all: it starts on a cached step, with the
    features of frame 1's batch of 2 rows for a batch of 2f (a RuntimeError in the UNet)."""
    ours, refs = pipes
    pipe = text_to_video_zero_pipeline(*refs)
    helper = helper_on(pipe, interval, branch)
    try:
        expected = pipe("a horse galloping", video_length=4, height=32, width=32, num_inference_steps=10, t0=2, t1=5,
                        generator=torch.Generator().manual_seed(7), motion_field_strength_x=12.0,
                        motion_field_strength_y=12.0).images
    finally:
        helper.disable()
    video = video_with_cache(ours, (interval, branch), ddpm_marginal="reference",
                             generator=torch.Generator().manual_seed(7), **VIDEO)
    assert_parity(video, torch.from_numpy(expected))
    plain = ours("a horse galloping", ddpm_marginal="reference", generator=torch.Generator().manual_seed(7),
                 progress=False, **VIDEO)
    assert not torch.allclose(video, plain, atol=1e-3)


@torch.no_grad()
def test_the_helper_fails_where_t2v_zero_restarts_on_a_cached_step(pipes):
    """N = 3 ∤ 4: the helper's video loop starts on a cached step with frame 1's 2-row features (see above)."""
    _, refs = pipes
    pipe = text_to_video_zero_pipeline(*refs)
    helper = helper_on(pipe, 3, 0)
    try:
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            pipe("a horse galloping", video_length=4, height=32, width=32, num_inference_steps=10, t0=2, t1=5,
                 generator=torch.Generator().manual_seed(7))
    finally:
        helper.disable()


@torch.no_grad()
def test_chunked_video_with_caching_equals_unchunked(pipes):
    """Each chunk caches its own frames' features and every chunk skips the same layers on the same steps, so
    with caching, too, chunked generation equals unchunked (frame 1's keys and values replayed in the branch)."""
    ours, _ = pipes
    common = dict(VIDEO, num_frames=7)
    for cache in ((2, 1), (3, 5)):
        full = video_with_cache(ours, cache, generator=torch.Generator().manual_seed(5), **common)
        for chunk_size in (2, 3):
            chunked = video_with_cache(ours, cache, chunk_size=chunk_size,
                                       generator=torch.Generator().manual_seed(5), **common)
            assert_parity(chunked, full)


@torch.no_grad()
def test_without_motion_dynamics_frame_one_is_the_cached_text_to_image_result(pipes, monkeypatch):
    """The ablation is one loop from T: frame 1 attends to itself only and has its own cached features, so it is
    the image text_to_image makes from the same x_T with the same caching."""
    ours, _ = pipes
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    frames = video_with_cache(ours, (3, 2), num_frames=3, height=32, width=32, num_inference_steps=8,
                              t0=1, t1=3, latents=x_T, motion_dynamics=False,
                              generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(t2vz_image, "ddim_denoise", functools.partial(sampling.ddim_denoise, cache=(3, 2)))
    image = t2vz.text_to_image(ours.sd, "a horse galloping", 32, 32, 8, latents=x_T, progress=False)
    assert_parity(frames[0], image)


@torch.no_grad()
def test_ddim_denoise_interval_1_is_bit_identical(pipes):
    ours, _ = pipes
    sd = ours.sd
    scheduler = DDIM(5)
    context = sampling.encode_prompts(sd, ["a cat"]).context
    x = torch.randn(3, 4, 16, 16)
    common = (sd, x, scheduler, scheduler.timesteps, context, 7.5, None, CrossFrame(3))
    plain = sampling.ddim_denoise(*common, progress=False)
    assert torch.equal(sampling.ddim_denoise(*common, progress=False, cache=(1, 2)), plain)
    assert not torch.equal(sampling.ddim_denoise(*common, progress=False, cache=(2, 2)), plain)

"""The fast modes at the pipelines' level (t2vz/method/fast.py): token merging and feature caching as keywords of
TextToVideoZero, ControlVideo and VideoInstructPix2Pix. Their defaults (ratio 0, interval 1) are the exact path bit
for bit; each mode changes the frames and does less work; chunked equals unchunked with them; the merged frames
equal diffusers' TextToVideoZeroPipeline with tomesd patched in (the authors' composition) within
conftest.PARITY_RTOL; bad values are one clear error. The UNet-level oracles are in test_tome.py and
test_deepcache.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_parity
from reference_models import text_to_video_zero_pipeline, tiny_reference_folder

from t2vz import TextToVideoZero
from t2vz.method.fast import FastModes

COMMON = dict(num_frames=3, height=32, width=32, num_inference_steps=6, t0=1, t1=3, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, refs = tiny_reference_folder(tmp_path_factory.mktemp("m") / "tiny")
    return TextToVideoZero.from_pretrained(folder), refs


def frames(pipe, seed=3, **kwargs):
    return pipe("a horse galloping", generator=torch.Generator().manual_seed(seed), **{**COMMON, **kwargs})


@torch.no_grad()
def test_defaults_are_the_exact_path_bit_for_bit(tiny):
    pipe, _ = tiny
    exact = frames(pipe)
    assert torch.equal(frames(pipe, merging_ratio=0.0, cache_interval=1), exact)
    assert torch.equal(frames(pipe, merging_ratio=0.0, merging_max_downsample=8, cache_interval=1, cache_branch=2),
                       exact)


@torch.no_grad()
def test_each_mode_changes_the_frames_and_calls_the_deep_layers_less(tiny):
    pipe, _ = tiny
    exact = frames(pipe)
    merged = frames(pipe, merging_ratio=0.5)
    assert not torch.equal(merged, exact) and (merged - exact).abs().max() < 0.5
    calls = []
    handle = pipe.sd.unet.mid_block.register_forward_hook(lambda *args: calls.append(1))
    try:
        cached = frames(pipe, cache_interval=2)
        deep_cached = len(calls)
        calls.clear()
        frames(pipe)
        deep_exact = len(calls)
    finally:
        handle.remove()
    assert not torch.equal(cached, exact)
    # 6 steps: frame 1 alone T → T0 (4 steps in two loops of 2 and 2), then 4 steps on every frame; each loop
    # starts on a full pass, then every other step is full
    assert deep_exact == 8 and deep_cached == 4, (deep_exact, deep_cached)


@torch.no_grad()
def test_chunked_equals_unchunked_with_fast_modes(tiny):
    pipe, _ = tiny
    for mode in (dict(merging_ratio=0.5), dict(cache_interval=2), dict(merging_ratio=0.5, cache_interval=3)):
        whole = frames(pipe, num_frames=5, **mode)
        chunked = frames(pipe, num_frames=5, chunk_size=2, **mode)
        assert_parity(chunked, whole)


@pytest.mark.parametrize("ratio, steps, t0, t1", [(0.5, 6, 1, 3), (0.3, 8, 2, 5)])
@torch.no_grad()
def test_merging_matches_diffusers_with_tomesd(tiny, ratio, steps, t0, t1):
    """The authors' composition: diffusers' TextToVideoZeroPipeline with tomesd.apply_patch(pipe, ratio) (random
    destinations, tomesd's default), its stream forked from torch's global RNG seeded like our generator."""
    tomesd = pytest.importorskip("tomesd")
    pipe, refs = tiny
    ours = frames(pipe, seed=7, merging_ratio=ratio, num_inference_steps=steps, t0=t0, t1=t1, ddpm_marginal="reference")
    ref_pipe = text_to_video_zero_pipeline(*refs)
    tomesd.apply_patch(ref_pipe, ratio=ratio)
    try:
        torch.manual_seed(7)  # tomesd forks the global RNG at the first UNet call
        out = ref_pipe("a horse galloping", video_length=3, height=32, width=32, num_inference_steps=steps, t0=t0,
                       t1=t1, generator=torch.Generator().manual_seed(7), motion_field_strength_x=12.0,
                       motion_field_strength_y=12.0).images
    finally:
        tomesd.remove_patch(ref_pipe)
    assert_parity(ours, torch.from_numpy(np.asarray(out)))
    assert not torch.equal(ours, frames(pipe, seed=7, num_inference_steps=steps, t0=t0, t1=t1,
                                        ddpm_marginal="reference"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(merging_ratio=1.0), "ratio=1.0 must be in [0, 1)"),
    (dict(merging_ratio=-0.1), "ratio=-0.1"),
    (dict(merging_ratio=0.5, merging_max_downsample=3), "max_downsample=3 must be one of"),
    (dict(merging_ratio=0.5, merging_options={"sz": 2}), "unknown key(s) sz"),
    (dict(cache_interval=0), "cache_interval=0"),
    (dict(cache_interval=2, cache_branch=-1), "cache_branch=-1"),
])
def test_bad_fast_modes_name_the_value(tiny, kwargs, message):
    pipe, _ = tiny
    with pytest.raises(ValueError) as e:
        frames(pipe, **kwargs)
    assert message in str(e.value)


def test_fast_modes_fork_the_generator_without_drawing_from_it():
    g = torch.Generator().manual_seed(11)
    merging = FastModes(merging_ratio=0.5).checked().token_merging(g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(11).get_state())
    assert torch.equal(merging.generator.get_state(), g.get_state()) and merging.generator is not g
    assert FastModes().token_merging(g) is None and FastModes().cache is None
    assert FastModes(cache_interval=3, cache_branch=1).cache == (3, 1)

"""Token Merging for SD (t2vz/sd/tome.py): its defining properties, and parity with the authors' `tomesd` patched
into diffusers (the UNet alone, with cross-frame attention, and TextToVideoZeroPipeline), fp32, tolerance:
conftest.PARITY_RTOL."""
from __future__ import annotations

import functools
import math
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import assert_parity, perturb_
from reference_models import TINY_UNET, diffusers_unet, text_to_video_zero_pipeline, tiny_reference_folder

from t2vz.method.chunks import eps_by_chunks
from t2vz.sd.attention import BasicTransformerBlock, CrossFrame
from t2vz.sd.loading import build_loaded
from t2vz.sd.tome import TokenMerging, bipartite_soft_matching, merging_at, partition
from t2vz.sd.unet import UNet

tomesd = pytest.importorskip("tomesd")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    """TINY_UNET: level 0 (transformers in down_blocks.0 and up_blocks.1) and the mid block at level 1."""
    ref = diffusers_unet(TINY_UNET)
    return ref, build_loaded(UNet, TINY_UNET, ref.state_dict()).eval()


@contextmanager
def tomesd_patched(model, **options):
    tomesd.apply_patch(model, **options)
    try:
        yield model
    finally:
        tomesd.remove_patch(model)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the exact path ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_ratio_zero_is_the_exact_path_bit_for_bit(tiny, monkeypatch):
    """merging=None and ratio 0 give the same bits as no keyword, and ratio 0 runs no merging code at all."""
    _, ours = tiny
    x, context = torch.randn(6, 4, 16, 16), torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    for frames in (None, CrossFrame(3)):
        plain = ours(x, 500, context, cross_frame=frames)
        assert torch.equal(ours(x, 500, context, cross_frame=frames, merging=None), plain)
        monkeypatch.setattr(BasicTransformerBlock, "merged_forward", None)  # would raise if called
        zero = TokenMerging(ratio=0, max_downsample=8, merge_crossattn=True, merge_mlp=True)
        assert torch.equal(ours(x, 500, context, cross_frame=frames, merging=zero), plain)
        assert zero.generator is None  # not even the global RNG was forked
        monkeypatch.undo()


@torch.no_grad()
def test_controlnet_encoder_takes_merging():
    """The ControlNet's copy of the encoder merges like the UNet's (tomesd leaves a ControlNet alone: None)."""
    from reference_models import TINY_CONTROLNET

    from t2vz.sd.controlnet import ControlNet

    net = perturb_(ControlNet(TINY_CONTROLNET)).eval()
    x, context, control = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32), torch.rand(2, 3, 128, 128)
    plain = net(x, 500, context, control)
    zero = net(x, 500, context, control, merging=TokenMerging(ratio=0))
    merged = net(x, 500, context, control, merging=TokenMerging(ratio=0.5, generator=seeded(0)))
    assert all(torch.equal(a, b) for a, b in zip(plain[0] + [plain[1]], zero[0] + [zero[1]]))
    assert not torch.allclose(merged[1], plain[1], atol=1e-3)


# ---- the defining properties ---------------------------------------------------------------------------------------


def sublayer_token_counts(unet, run) -> dict[str, list[int]]:
    """Tokens entering attn1, attn2 and ff of every transformer block, in forward order, during `run()`."""
    counts = {"attn1": [], "attn2": [], "ff": []}
    handles = [getattr(block, name).register_forward_pre_hook(
                   lambda module, args, name=name: counts[name].append(args[0].shape[1]))
               for block in unet.modules() if isinstance(block, BasicTransformerBlock) for name in counts]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return counts


@pytest.mark.parametrize("h,w,ratio,max_downsample,expected", [
    (16, 16, 0.5, 1, [128, 128, 64, 128, 128, 128]),  # level 0: 256 − 128; the mid block (8×8) untouched
    (16, 16, 0.5, 2, [128, 128, 32, 128, 128, 128]),  # the mid block too: 64 − 32
    (15, 17, 0.3, 2, [255 - 76, 255 - 76, 72 - 21, 255 - 76, 255 - 76, 255 - 76]),  # odd grids: r = ⌊n·ratio⌋
    (16, 16, 0.9, 1, [64, 64, 64, 64, 64, 64]),  # r is capped at the 192 sources: the 64 destinations are left
])
@torch.no_grad()
def test_merged_token_count_per_level(tiny, h, w, ratio, max_downsample, expected):
    _, ours = tiny
    x, context = torch.randn(2, 4, h, w), torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    merging = TokenMerging(ratio=ratio, max_downsample=max_downsample, merge_mlp=True, generator=seeded(0))
    counts = sublayer_token_counts(ours, lambda: ours(x, 500, context, merging=merging))
    assert counts["attn1"] == counts["ff"] == expected  # merge_mlp=True
    n = [h * w, h * w, math.ceil(h / 2) * math.ceil(w / 2), h * w, h * w, h * w]
    assert counts["attn2"] == n  # merge_crossattn=False: text cross-attention sees every token


def random_matching(b: int, h: int, w: int, ratio: float, seed: int = 0, x: torch.Tensor | None = None):
    x = torch.randn(b, h * w, 8, generator=seeded(seed + 1)) if x is None else x
    return x, TokenMerging(ratio=ratio, generator=seeded(seed)).plan(x, h, w)


def test_unmerge_of_merge_gives_every_group_its_mean():
    """A destination and the sources merged into it all come back as their mean; every other token unchanged."""
    x, m = random_matching(2, 6, 6, 0.5)
    merged = m.merge(x)
    assert merged.shape == (2, 36 - 18, 8) and m.r == 18
    back = m.unmerge(merged)
    for row in range(2):
        groups = {j: [int(m.dst[j])] for j in range(m.dst.numel())}
        for i, j in zip(m.merged[row].tolist(), m.into[row].tolist()):
            groups[j].append(int(m.src[i]))
        for members in groups.values():
            expected = x[row, members].mean(dim=0).expand(len(members), -1)
            torch.testing.assert_close(back[row, members], expected)
        kept = m.src[m.kept[row]]
        assert torch.equal(back[row, kept], x[row, kept])
    assert sum(len(g) - 1 for g in groups.values()) == 18


def test_unmerge_of_merge_is_identity_when_merged_tokens_equal_their_destination():
    """A 4×4 grid whose top-left tokens (the fixed destinations) each have one exact copy in their cell: the r = 4
    most similar sources are those copies, each merged into its original; the mean of two equal tokens is that
    token, so unmerge(merge(x)) == x bit for bit."""
    x = torch.randn(1, 16, 8)
    for top_left, copy in ((0, 5), (2, 7), (8, 13), (10, 15)):  # each 2×2 cell's top-left and bottom-right
        x[0, copy] = x[0, top_left]
    m = TokenMerging(ratio=0.25, use_rand=False).plan(x, 4, 4)
    assert sorted(m.src[m.merged[0]].tolist()) == [5, 7, 13, 15]
    assert torch.equal(m.unmerge(m.merge(x)), x)


@pytest.mark.parametrize("b,h,w", [(2, 6, 6), (3, 15, 17)])
def test_with_nothing_merged_merge_is_a_permutation_and_unmerge_its_inverse(b, h, w):
    x = torch.randn(b, h * w, 8)
    src, dst = partition(h, w, 2, 2, torch.zeros(h // 2, w // 2, dtype=torch.long))
    m = bipartite_soft_matching(x, src, dst, 0)
    merged = m.merge(x)
    assert sorted(merged[0, :, 0].tolist()) == sorted(x[0, :, 0].tolist())
    assert torch.equal(m.unmerge(merged), x)


def test_destinations_top_left_or_one_random_token_per_cell():
    """Fixed: the top-left token of each whole 2×2 cell (the last row and column of a 5×7 grid are all sources).
    Random: one token in each cell, from one draw of the stream; the same seed gives the same partition."""
    src, dst = partition(5, 7, 2, 2, TokenMerging(use_rand=False).destination_choice(5, 7, 2, CPU))
    assert sorted(dst.tolist()) == [row * 7 + col for row in (0, 2) for col in (0, 2, 4)]
    assert sorted(src.tolist() + dst.tolist()) == list(range(35))

    merging = TokenMerging(generator=seeded(0))
    choices = [merging.destination_choice(8, 8, 2, CPU) for _ in range(2)]
    assert not torch.equal(choices[0], choices[1])  # one draw per call
    assert torch.equal(choices[0], TokenMerging(generator=seeded(0)).destination_choice(8, 8, 2, CPU))
    for choice in choices:
        _, dst = partition(8, 8, 2, 2, choice)
        cells = sorted((int(i) // 8 // 2, int(i) % 8 // 2) for i in dst)
        assert cells == [(r, c) for r in range(4) for c in range(4)]  # exactly one destination per cell
    assert torch.cat(choices).unique().numel() > 1  # not the top-left everywhere


def test_odd_batch_uses_fixed_destinations_and_draws_nothing():
    """tomesd turns use_rand off for a batch of odd size (the guidance branches of one image are not together)."""
    merging = TokenMerging(generator=seeded(0))
    state = merging.generator.get_state()
    assert torch.equal(merging.destination_choice(8, 8, 3, CPU), torch.zeros(4, 4, dtype=torch.long))
    assert torch.equal(merging.generator.get_state(), state)


def test_no_generator_forks_the_global_rng_and_leaves_it_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    merging = TokenMerging()
    choice = merging.destination_choice(8, 8, 2, CPU)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(choice, TokenMerging(generator=seeded(123)).destination_choice(8, 8, 2, CPU))
    assert not torch.equal(merging.destination_choice(8, 8, 2, CPU), choice)  # the fork is kept and continues


def test_grids_smaller_than_a_cell_merge_nothing():
    """tomesd fails on them (no destinations to match); here the block runs unmerged."""
    x = torch.randn(2, 5, 8)
    assert TokenMerging(ratio=0.5).plan(x, 1, 5) is None
    assert TokenMerging(ratio=0.1).plan(torch.randn(2, 4, 8), 2, 2) is None  # r = ⌊0.4⌋ = 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=1.0), r"ratio=1.0 must be in \[0, 1\)"),
    (dict(ratio=-0.1), r"ratio=-0.1 must be in \[0, 1\)"),
    (dict(ratio=float("nan")), r"ratio=nan must be in \[0, 1\)"),
    (dict(ratio="0.5"), r"ratio='0.5' must be in \[0, 1\)"),
    (dict(sx=0), "sx=0 must be an integer >= 1"),
    (dict(sy=1.5), "sy=1.5 must be an integer >= 1"),
    (dict(max_downsample=3), r"max_downsample=3 must be one of \(1, 2, 4, 8\)"),
    (dict(max_downsample=True), r"max_downsample=True must be one of \(1, 2, 4, 8\)"),
    (dict(use_rand=1), "use_rand=1 must be True or False"),
])
def test_bad_options_name_the_value_and_the_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenMerging(**kwargs)


def tomesd_downsample(latent: tuple[int, int], n: int) -> int:
    """tomesd.patch.compute_merge's downsampling of a block with n tokens."""
    return math.ceil(math.sqrt(latent[0] * latent[1] // n))


def test_level_rule_agrees_with_tomesd_wherever_tomesd_merges():
    """`merging_at` merges at level i iff 2**i <= max_downsample; tomesd at d = ⌈√(h₀w₀ // n)⌉ <= max_downsample on
    a ⌈h₀/d⌉×⌈w₀/d⌉ grid. For every latent up to 64×64 and every level of a 4-level UNet: where this merges, tomesd
    does too on the same grid or fails (its grid has more tokens than the block); where tomesd merges something
    (a whole 2×2 cell) on the right grid, this does too."""
    merging = {md: TokenMerging(max_downsample=md) for md in (1, 2, 4, 8)}
    for h0 in range(1, 65):
        for w0 in range(1, 65):
            h, w = h0, w0
            for level in range(4):
                d = tomesd_downsample((h0, w0), h * w)
                grid = (math.ceil(h0 / d), math.ceil(w0 / d))
                for md, options in merging.items():
                    ours = merging_at(options, level) is not None
                    if ours:
                        assert d <= md and (grid == (h, w) or grid[0] * grid[1] > h * w), (h0, w0, level, md)
                    if d <= md and grid == (h, w) and h >= 2 and w >= 2:
                        assert ours, (h0, w0, level, md)
                h, w = math.ceil(h / 2), math.ceil(w / 2)
    with pytest.raises(RuntimeError):  # e.g. a 9×8 latent at level 3: 2×1 tokens, tomesd's d = 6 and grid 2×2
        tomesd.merge.bipartite_soft_matching_random2d(torch.randn(2, 2, 8), w=2, h=2, sx=2, sy=2, r=1, no_rand=True)


# ---- parity with tomesd --------------------------------------------------------------------------------------------

ORACLE_CASES = {  # options, batch, latent h×w, the destination stream: forked from the global RNG or supplied
    "fixed-0.5": (dict(ratio=0.5, use_rand=False), 2, (16, 16), "global"),
    "random-0.5": (dict(ratio=0.5), 2, (16, 16), "global"),
    "random-0.5-supplied-generator": (dict(ratio=0.5), 2, (16, 16), "supplied"),
    "random-0.3-down2-all-sublayers": (
        dict(ratio=0.3, max_downsample=2, merge_crossattn=True, merge_mlp=True), 4, (16, 16), "supplied"),
    "random-0.75-stride3x2-odd-latent": (dict(ratio=0.75, max_downsample=2, sx=3, sy=2), 2, (15, 17), "global"),
    "random-odd-batch": (dict(ratio=0.5), 3, (16, 16), "global"),
}


@pytest.mark.parametrize("case", list(ORACLE_CASES))
@torch.no_grad()
def test_unet_matches_tomesd(tiny, case):
    """Two UNet calls in a row (the random stream carries on between them), the destination stream forked from
    the global RNG (generator=None, as tomesd) or supplied as a generator seeded alike."""
    ref, ours = tiny
    options, b, (h, w), stream = ORACLE_CASES[case]
    x, context = torch.randn(b, 4, h, w), torch.randn(b, 77, TINY_UNET.cross_attention_dim)
    with tomesd_patched(ref, **options):
        torch.manual_seed(5)
        expected = [ref(x, t, context).sample for t in (700, 400)]
    torch.manual_seed(5)
    merging = TokenMerging(**options, generator=None if stream == "global" else seeded(5))
    got = [ours(x, t, context, merging=merging) for t in (700, 400)]
    for g, e in zip(got, expected):
        assert_parity(g, e)
    assert not torch.allclose(got[0], ours(x, 700, context), atol=1e-2)  # merging changes the output
    if options.get("use_rand", True) and b % 2 == 0:  # and the stream decides it: another seed differs
        other = ours(x, 700, context, merging=TokenMerging(**options, generator=seeded(6)))
        assert not torch.allclose(other, expected[0], atol=1e-3)


@pytest.mark.parametrize("options", [dict(ratio=0.5), dict(ratio=0.6, max_downsample=2, use_rand=False)])
@torch.no_grad()
def test_unet_with_cross_frame_attention_matches_tomesd_with_the_cross_frame_processor(tiny, options):
    """T2V-Zero's composition: every frame merged with its own matching, frame 1's keys and values taken from its
    merged tokens (diffusers' CrossFrameAttnProcessor on the tomesd-patched UNet)."""
    from diffusers import TextToVideoZeroPipeline

    ref, ours = tiny
    CrossFrameAttnProcessor2_0 = sys.modules[TextToVideoZeroPipeline.__module__].CrossFrameAttnProcessor2_0
    f, x = 3, torch.randn(2 * 3, 4, 16, 16)
    context = torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    original = ref.attn_processors
    ref.set_attn_processor(CrossFrameAttnProcessor2_0(batch_size=2))
    try:
        with tomesd_patched(ref, **options):
            torch.manual_seed(8)
            expected = ref(x, 500, context.repeat_interleave(f, dim=0)).sample
    finally:
        ref.set_attn_processor(original)
    got = ours(x, 500, context, cross_frame=CrossFrame(f), merging=TokenMerging(**options, generator=seeded(8)))
    assert_parity(got, expected)


def unet_on_chunks(unet, context, merging):
    """The chunk predictor of `eps_by_chunks`: the UNet on a chunk's rows, with that chunk's CrossFrame."""
    return lambda rows, t, ids, frames: unet(rows, t, context, cross_frame=frames, merging=merging)


@torch.no_grad()
def test_chunks_replay_the_destination_choice(tiny):
    """Chunked = unchunked with random destinations: the first chunk's draw is replayed by the later chunks, so
    the stream advances once per block and step, as in one call."""
    _, ours = tiny
    f, x = 7, torch.randn(2 * 7, 4, 16, 16)
    context = torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    results, streams = [], []
    for chunk_size in (None, 3):
        merging = TokenMerging(ratio=0.5, generator=seeded(4))
        predict = eps_by_chunks(unet_on_chunks(ours, context, merging), CrossFrame(f), chunk_size)
        results.append(torch.cat([predict(x, torch.tensor(t)) for t in (600, 300)]))
        streams.append(merging.generator.get_state())
    assert_parity(results[1], results[0])
    assert torch.equal(streams[1], streams[0])


@torch.no_grad()
def test_text_to_video_zero_matches_diffusers_with_tomesd(tmp_path):
    """diffusers' TextToVideoZeroPipeline with `tomesd.apply_patch(pipe, ratio=0.5)` against TextToVideoZero whose
    every UNet call is given TokenMerging(ratio=0.5) with the stream tomesd forks (the global RNG seeded alike)."""
    from t2vz import TextToVideoZero

    folder, refs = tiny_reference_folder(tmp_path / "tiny")
    ours_pipe, ref_pipe = TextToVideoZero.from_pretrained(folder), text_to_video_zero_pipeline(*refs)
    common = dict(height=32, width=32, num_inference_steps=6, t0=2, t1=3)
    with tomesd_patched(ref_pipe, ratio=0.5):
        torch.manual_seed(21)
        ref = ref_pipe("a horse galloping", video_length=3, generator=seeded(7), motion_field_strength_x=12.0,
                       motion_field_strength_y=12.0, **common).images
    unet, merging = ours_pipe.sd.unet, TokenMerging(ratio=0.5, generator=seeded(21))
    unet.forward = functools.partial(type(unet).forward, unet, merging=merging)
    try:
        ours = ours_pipe("a horse galloping", num_frames=3, ddpm_marginal="reference", progress=False,
                         generator=seeded(7), **common)
    finally:
        del unet.forward
    assert_parity(ours, torch.from_numpy(np.asarray(ref)))
    assert not torch.equal(merging.generator.get_state(), seeded(21).get_state())  # it merged, drawing on the way


# ---- the stream's device, and the stream under torch.compile --------------------------------------------------------


def test_a_cuda_unet_draws_from_a_cuda_stream_seeded_as_the_generator(monkeypatch):
    """tomesd draws on the UNet's device, from its fork of that device's RNG: on CUDA the CUDA RNG, which
    torch.manual_seed(s) seeds with s. So a merging for a CUDA UNet, given a CPU generator seeded with s, draws from
    a CUDA generator seeded with s (tomesd's stream after torch.manual_seed(s)), whatever was drawn from the CPU
    generator since; a generator of the UNet's device (the CPU's here) is copied as it stands. Before, the CPU
    generator was copied on every device, and a CUDA UNet's destinations were drawn on the CPU. The CUDA generator
    is stood in for by a CPU one here; tests/test_cuda_attention.py compares with tomesd on a GPU."""
    from t2vz.method.fast import FastModes
    from t2vz.sd import tome as tome_module

    made = []

    def seeded_on(device, seed):
        made.append((device, seed))
        return seeded(seed)

    monkeypatch.setattr(tome_module, "seeded_generator", seeded_on)
    g = seeded(7)
    torch.randn(3, generator=g)  # the generation's stream moved on
    merging = FastModes(merging_ratio=0.5).checked().token_merging(g, "cuda")
    assert made == [(torch.device("cuda"), 7)]
    assert torch.equal(merging.generator.get_state(), seeded(7).get_state())
    for device in (None, "cpu", torch.device("meta")):
        other = TokenMerging(device=device, generator=g)
        assert made == [(torch.device("cuda"), 7)] and torch.equal(other.generator.get_state(), g.get_state())
    assert not torch.equal(g.get_state(), seeded(7).get_state())  # read, never drawn from


def test_the_stream_is_a_copy_the_merging_advances():
    """`generator` is copied into the merging's stream (a state tensor the draws advance, `RandomStream`); each read
    of `merging.generator` is a new generator in the stream's current state. The caller's generator stays where it
    was, and the draws are the ones the generator itself would give."""
    g = seeded(3)
    merging = TokenMerging(generator=g)
    first = merging.destination_choice(8, 8, 2, CPU)
    assert torch.equal(g.get_state(), seeded(3).get_state())
    assert torch.equal(first[..., None], torch.randint(4, (4, 4, 1), generator=g))
    assert torch.equal(merging.generator.get_state(), g.get_state())
    assert merging.generator is not merging.generator
    with pytest.raises(ValueError, match="generator=3 must be a torch.Generator or None"):
        TokenMerging(generator=3)

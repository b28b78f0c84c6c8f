"""The UNet as Stable Diffusion XL's (per-level heads and transformer depth, linear projections, the text_time added
embedding) against diffusers' UNet2DConditionModel with the same config (copied, perturbed weights), fp32,
tolerance conftest.PARITY_RTOL: plain calls, one added conditioning per video, cross-frame attention, token merging
(tomesd), DeepCache (its helper), and the SDXL ControlNet encoder."""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import assert_parity
from reference_models import (
    SDXL_UNET, TINY_SDXL_POOLED_DIM, TINY_SDXL_UNET, TINY_UNET, diffusers_sdxl_unet, perturb_, sdxl_added_cond,
)

from t2vz.sd.attention import CrossFrame
from t2vz.sd.deepcache import FeatureCache, skip_count
from t2vz.sd.loading import build_loaded
from t2vz.sd.tome import TokenMerging
from t2vz.sd.unet import UNet

CTX = TINY_SDXL_UNET.cross_attention_dim


@pytest.fixture(scope="module")
def tiny():
    ref = diffusers_sdxl_unet(TINY_SDXL_UNET)
    return ref, build_loaded(UNet, TINY_SDXL_UNET, ref.state_dict()).eval()  # strict: every key is diffusers'


def cross_frame_processor():
    from diffusers import TextToVideoZeroPipeline

    return sys.modules[TextToVideoZeroPipeline.__module__].CrossFrameAttnProcessor2_0


def per_row(cond: dict[str, torch.Tensor], g: int) -> dict[str, torch.Tensor]:
    """Each row of an added conditioning repeated for its g consecutive batch rows, as diffusers needs it."""
    return {k: v.repeat_interleave(g, dim=0) for k, v in cond.items()}


def test_state_dict_keys_are_diffusers_sdxl_keys(tiny):
    ref, ours = tiny
    assert ours.state_dict().keys() == ref.state_dict().keys()
    keys = ours.state_dict().keys()
    assert {"add_embedding.linear_1.weight", "add_embedding.linear_2.bias"} <= keys
    assert "down_blocks.2.attentions.1.transformer_blocks.2.attn1.to_q.weight" in keys  # depth 3 at level 2
    assert "mid_block.attentions.0.transformer_blocks.2.ff.net.2.weight" in keys  # the mid block: the deepest's
    assert not any(k.startswith("down_blocks.0.attentions") for k in keys)  # level 0: no attention
    assert ours.down_blocks[1].attentions[0].proj_in.weight.shape == (64, 64)  # linear, not 1×1 conv
    assert ours.up_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 4


@pytest.mark.parametrize("n,size,t", [
    (2, (16, 16), torch.tensor(981)),               # a CFG batch: unconditional and conditional rows
    (3, (16, 24), torch.tensor([0, 500, 999])),     # non-square, a timestep per row
    (1, (9, 7), 321),                               # odd sizes: upsampling lands on each skip's size
])
@torch.no_grad()
def test_tiny_sdxl_unet_matches_diffusers(tiny, n, size, t):
    ref, ours = tiny
    x, context = torch.randn(n, 4, *size), torch.randn(n, 77, CTX)
    cond = sdxl_added_cond(n, TINY_SDXL_POOLED_DIM, seed=n)
    expected = ref(x, t, context, added_cond_kwargs=cond).sample
    assert_parity(ours(x, t, context, added_cond=cond), expected)
    other = dict(cond, time_ids=cond["time_ids"] + 64)  # the micro-conditioning reaches the output
    assert not torch.allclose(ours(x, t, context, added_cond=other), expected, atol=1e-3)


@torch.no_grad()
def test_added_cond_per_video_matches_diffusers_with_added_cond_per_frame(tiny):
    """One context and one added conditioning per video (the pipelines' rows), diffusers given them per frame."""
    ref, ours = tiny
    f, x = 3, torch.randn(2 * 3, 4, 8, 8)
    context, cond = torch.randn(2, 77, CTX), sdxl_added_cond(2, TINY_SDXL_POOLED_DIM)
    expected = ref(x, 500, context.repeat_interleave(f, dim=0), added_cond_kwargs=per_row(cond, f)).sample
    assert_parity(ours(x, 500, context, added_cond=cond), expected)
    # an added conditioning per frame with a context per video: each has its own row rule
    assert_parity(ours(x, 500, context, added_cond=per_row(cond, f)), expected)


@pytest.mark.parametrize("levels", [None, (1,), (2,)])
@torch.no_grad()
def test_cross_frame_attention_matches_diffusers_cross_frame_processor(tiny, levels):
    """T2V-Zero's cross-frame attention (Eq. 8) in every `attn1` (levels None), or in those of one level:
    diffusers' CrossFrameAttnProcessor2_0 on exactly those layers (TINY_SDXL_UNET: level 1 has
    down_blocks.1 and up_blocks.1, level 2 down_blocks.2, up_blocks.0 and the mid block; level 0 none)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    ref, ours = tiny
    level_of = {"down_blocks.1": 1, "up_blocks.1": 1, "down_blocks.2": 2, "up_blocks.0": 2, "mid_block.attentions": 2}
    original = ref.attn_processors
    chosen = [name for name in original if name.endswith("attn1.processor")
              and (levels is None or level_of[".".join(name.split(".")[:2])] in levels)]
    assert chosen
    processor = cross_frame_processor()
    ref.set_attn_processor({name: processor(batch_size=2) if name in chosen else AttnProcessor2_0()
                            for name in original})
    f, x = 3, torch.randn(2 * 3, 4, 8, 12)
    context, cond = torch.randn(2, 77, CTX), sdxl_added_cond(2, TINY_SDXL_POOLED_DIM, seed=3)
    try:
        expected = ref(x, 500, context.repeat_interleave(f, dim=0), added_cond_kwargs=per_row(cond, f)).sample
    finally:
        ref.set_attn_processor(original)
    got = ours(x, 500, context, cross_frame=CrossFrame(f, levels=levels), added_cond=cond)
    assert_parity(got, expected)
    assert not torch.allclose(got, ours(x, 500, context, added_cond=cond), atol=1e-4)


@pytest.mark.parametrize("options,cross_frame", [
    (dict(ratio=0.5, max_downsample=2), False),
    (dict(ratio=0.4, max_downsample=4, merge_crossattn=True, merge_mlp=True), False),
    (dict(ratio=0.5, max_downsample=2), True),
])
@torch.no_grad()
def test_token_merging_matches_tomesd(tiny, options, cross_frame):
    """ToMe for SD in the SDXL transformers (several blocks each, each with its own matching), against tomesd
    patched into diffusers' SDXL UNet; with cross-frame attention, diffusers' processor on the patched UNet.
    max_downsample >= 2: SDXL has no transformer at level 0, where tomesd's default (1) would merge."""
    tomesd = pytest.importorskip("tomesd")
    ref, ours = tiny
    b = 2 * 3 if cross_frame else 2
    x, context = torch.randn(b, 4, 16, 16), torch.randn(2, 77, CTX)
    cond = sdxl_added_cond(2, TINY_SDXL_POOLED_DIM, seed=4)
    g = b // 2
    original = ref.attn_processors
    if cross_frame:
        ref.set_attn_processor(cross_frame_processor()(batch_size=2))
    tomesd.apply_patch(ref, **options)
    try:
        torch.manual_seed(8)
        expected = ref(x, 500, context.repeat_interleave(g, dim=0), added_cond_kwargs=per_row(cond, g)).sample
    finally:
        tomesd.remove_patch(ref)
        ref.set_attn_processor(original)
    frames = CrossFrame(3) if cross_frame else None
    merging = TokenMerging(**options, generator=torch.Generator().manual_seed(8))
    got = ours(x, 500, context, cross_frame=frames, merging=merging, added_cond=cond)
    assert_parity(got, expected)
    assert not torch.allclose(got, ours(x, 500, context, cross_frame=frames, added_cond=cond), atol=1e-3)


@pytest.mark.parametrize("interval,branch", [(2, 0), (3, 4), (2, 8)])
@torch.no_grad()
def test_deepcache_matches_the_helper(tiny, interval, branch):
    """Five steps of a trajectory (new x, t and added conditioning each) against DeepCache's DeepCacheSDHelper on
    diffusers' SDXL UNet: the added embedding conditions the cached calls' branch too (the timestep embedding is
    computed on every call). Branches 0..8: three levels of three layers."""
    from DeepCache import DeepCacheSDHelper

    ref, ours = tiny
    assert skip_count(TINY_SDXL_UNET) == 9
    timesteps = [981, 781, 581, 381, 181]
    pipe = type("Bare", (), {})()
    pipe.unet, pipe.scheduler = ref, type("S", (), {"timesteps": torch.tensor(timesteps)})()
    helper = DeepCacheSDHelper(pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    cache = FeatureCache(interval, branch)
    try:
        for i, t in enumerate(timesteps):
            gen = torch.Generator().manual_seed(i)
            x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, CTX, generator=gen)
            cond = sdxl_added_cond(2, TINY_SDXL_POOLED_DIM, seed=10 + i)
            expected = ref(x, torch.tensor(t), context, added_cond_kwargs=cond).sample
            assert_parity(ours(x, t, context, cache=cache, added_cond=cond), expected)
    finally:
        helper.disable()
    assert cache.calls == 5


@torch.no_grad()
def test_sdxl_controlnet_matches_diffusers():
    """The ControlNet copies the SDXL encoder, add_embedding included: diffusers' ControlNetModel of that config."""
    from diffusers import ControlNetModel

    from t2vz.sd.controlnet import ControlNet, ControlNetConfig

    cfg = ControlNetConfig.from_unet(TINY_SDXL_UNET, conditioning_embedding_out_channels=(8, 16, 16, 32))
    ref = perturb_(ControlNetModel(
        block_out_channels=cfg.block_out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        attention_head_dim=cfg.num_attention_heads, transformer_layers_per_block=cfg.transformer_layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=cfg.norm_num_groups,
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim,
        conditioning_embedding_out_channels=cfg.conditioning_embedding_out_channels,
    )).eval()
    ours = build_loaded(ControlNet, cfg, ref.state_dict()).eval()
    x, context, control = torch.randn(2, 4, 8, 8), torch.randn(2, 77, CTX), torch.rand(2, 3, 64, 64)
    cond = sdxl_added_cond(2, TINY_SDXL_POOLED_DIM, seed=5)
    out = ref(x, 500, context, control, added_cond_kwargs=cond, return_dict=False)
    down, mid = ours(x, 500, context, control, added_cond=cond)
    assert len(down) == len(out[0])
    for a, b in zip(down + [mid], list(out[0]) + [out[1]]):
        assert_parity(a, b)


@torch.no_grad()
def test_added_cond_errors_name_what_is_needed(tiny):
    _, ours = tiny
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, CTX)
    cond = sdxl_added_cond(2, TINY_SDXL_POOLED_DIM)
    with pytest.raises(ValueError, match="needs added_cond with 'text_embeds'.*got None"):
        ours(x, 500, context)
    with pytest.raises(ValueError, match=r"needs added_cond.*got \['text_embeds'\]"):
        ours(x, 500, context, added_cond={"text_embeds": cond["text_embeds"]})
    with pytest.raises(ValueError, match="added_cond has 3 rows for a batch of 2"):
        ours(x, 500, context, added_cond=sdxl_added_cond(3, TINY_SDXL_POOLED_DIM))
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=80"):
        ours(x, 500, context, added_cond=sdxl_added_cond(2, TINY_SDXL_POOLED_DIM + 1))
    with pytest.raises(ValueError, match="same number of rows"):
        ours(x, 500, context, added_cond=dict(cond, time_ids=cond["time_ids"][:1]))
    sd15 = UNet(TINY_UNET).eval()
    with pytest.raises(ValueError, match="without an added embedding.*pass added_cond=None"):
        sd15(x, 500, torch.randn(2, 77, TINY_UNET.cross_attention_dim), added_cond=cond)


@pytest.mark.full
@torch.no_grad()
def test_sdxl_unet_matches_diffusers():
    """The full SDXL UNet (2.57G parameters, 10.3 GB in fp32), random perturbed weights, a 32×32 latent (256 px),
    both CFG branches with their own added conditioning. One copy of the weights in memory: ours shares the
    reference's tensors."""
    ref = diffusers_sdxl_unet(SDXL_UNET)
    ours = build_loaded(UNet, SDXL_UNET, ref.state_dict()).eval()
    params = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in ours.parameters()) == params == 2_567_463_684
    x, context = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 2048)
    cond = sdxl_added_cond(2, 1280)
    cond["time_ids"] = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 0, 1024, 1024]])
    t = torch.tensor([981, 1])
    expected = ref(x, t, context, added_cond_kwargs=cond).sample
    assert_parity(ours(x, t, context, added_cond=cond), expected)


def test_sdxl_config_is_the_released_one():
    """SDXL_UNET's fields as UNetConfig reads them: heads of 64 channels, the mid block at the deepest level."""
    cfg = SDXL_UNET
    assert [c // cfg.heads_at(i) for i, c in enumerate(cfg.block_out_channels)] == [64, 64, 64]
    assert [cfg.depth_at(i) for i in range(3)] == [1, 2, 10]
    assert cfg.projection_class_embeddings_input_dim == 1280 + 6 * cfg.addition_time_embed_dim

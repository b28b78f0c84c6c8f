"""UNet parity with diffusers' UNet2DConditionModel (copied, perturbed weights), fp32, tolerance: conftest.PARITY_RTOL."""
import pytest
import torch
from conftest import assert_parity
from reference_models import SD15_UNET, TINY_UNET, diffusers_unet

from t2vz.sd.loading import build_loaded
from t2vz.sd.unet import UNet, UNetConfig


def ours_from(ref, cfg: UNetConfig) -> UNet:
    return build_loaded(UNet, cfg, ref.state_dict()).eval()  # shares the reference's tensors


@pytest.fixture(scope="module")
def tiny():
    ref = diffusers_unet(TINY_UNET)
    return ref, ours_from(ref, TINY_UNET)


@pytest.mark.parametrize("t", [torch.tensor(981), 1, torch.tensor([0, 500, 999])])
@torch.no_grad()
def test_tiny_unet_matches_diffusers(tiny, t):
    ref, ours = tiny
    x = torch.randn(3, 4, 16, 24)  # non-square latent
    context = torch.randn(3, 77, TINY_UNET.cross_attention_dim)
    assert_parity(ours(x, t, context), ref(x, t, context).sample)


@torch.no_grad()
def test_unet_in_channels_configurable():
    cfg = UNetConfig(in_channels=8, block_out_channels=(32, 64), attention_levels=(False, True), cross_attention_dim=16)
    ref = diffusers_unet(cfg, seed=1)
    ours = ours_from(ref, cfg)
    x, context = torch.randn(2, 8, 8, 8), torch.randn(2, 5, 16)
    assert_parity(ours(x, 321, context), ref(x, 321, context).sample)


@torch.no_grad()
def test_odd_latent_sizes_match_diffusers():
    """520×392 px → a 65×49 latent: not divisible by 8, upsampling must land on each skip's size."""
    cfg = UNetConfig(block_out_channels=(32, 32, 64), attention_levels=(True, False, True), cross_attention_dim=32)
    ref = diffusers_unet(cfg, seed=2)
    x, context = torch.randn(1, 4, 65, 49), torch.randn(1, 77, 32)
    assert_parity(ours_from(ref, cfg)(x, 500, context), ref(x, 500, context).sample)


@pytest.mark.full
@torch.no_grad()
def test_sd15_unet_matches_diffusers():
    """The full SD 1.5 UNet (860M parameters), random perturbed weights, an 8×8 latent, both CFG branches."""
    ref = diffusers_unet(SD15_UNET)
    ours = ours_from(ref, SD15_UNET)  # shares the reference's tensors: no second copy in memory
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 859_520_964
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, 768)
    assert_parity(ours(x, torch.tensor([981, 1]), context), ref(x, torch.tensor([981, 1]), context).sample)


@torch.no_grad()
def test_context_per_video_matches_diffusers_with_context_per_frame(tiny):
    """The pipelines pass one text context per video; diffusers gets it repeated for every frame."""
    from t2vz.sd.attention import CrossFrame

    ref, ours = tiny
    import sys

    from diffusers import TextToVideoZeroPipeline

    CrossFrameAttnProcessor2_0 = sys.modules[TextToVideoZeroPipeline.__module__].CrossFrameAttnProcessor2_0
    f, x = 3, torch.randn(2 * 3, 4, 8, 8)
    context = torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    original = ref.attn_processors
    ref.set_attn_processor(CrossFrameAttnProcessor2_0(batch_size=2))
    try:
        expected = ref(x, 500, context.repeat_interleave(f, dim=0)).sample
    finally:
        ref.set_attn_processor(original)
    assert_parity(ours(x, 500, context, cross_frame=CrossFrame(f)), expected)
    with pytest.raises(ValueError, match="context has 4 rows for a batch of 6"):
        ours(x, 500, torch.randn(4, 77, TINY_UNET.cross_attention_dim))


@pytest.mark.parametrize("levels", [(0,), (1,)])
@torch.no_grad()
def test_cross_frame_levels_match_diffusers_with_processors_by_level(tiny, levels):
    """`CrossFrame(levels=...)` (an ablation) gives frame 1's keys and values to the self-attention of those UNet
    levels only: diffusers' UNet with its cross-frame processor on exactly those `attn1` layers (TINY_UNET: level 0
    has the transformers of down_blocks.0 and up_blocks.1, level 1 only the mid block's) and plain attention
    elsewhere."""
    import sys

    from diffusers import TextToVideoZeroPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    from t2vz.sd.attention import CrossFrame

    ref, ours = tiny
    CrossFrameAttnProcessor2_0 = sys.modules[TextToVideoZeroPipeline.__module__].CrossFrameAttnProcessor2_0
    level_of = {"down_blocks.0": 0, "up_blocks.1": 0, "mid_block": 1}  # the tiny UNet's transformers by level
    original = ref.attn_processors
    chosen = [name for name in original if name.endswith("attn1.processor")
              and level_of[".".join(name.split(".")[:2]) if not name.startswith("mid") else "mid_block"] in levels]
    assert chosen  # the parametrised levels each have self-attention layers
    ref.set_attn_processor({name: CrossFrameAttnProcessor2_0(batch_size=2) if name in chosen else AttnProcessor2_0()
                            for name in original})
    f, x = 3, torch.randn(2 * 3, 4, 8, 8)
    context = torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    try:
        expected = ref(x, 500, context.repeat_interleave(f, dim=0)).sample
    finally:
        ref.set_attn_processor(original)
    got = ours(x, 500, context, cross_frame=CrossFrame(f, levels=levels))
    assert_parity(got, expected)
    everywhere, nowhere = ours(x, 500, context, cross_frame=CrossFrame(f)), ours(x, 500, context)
    assert not torch.allclose(got, everywhere, atol=1e-4) and not torch.allclose(got, nowhere, atol=1e-4)
    assert torch.equal(ours(x, 500, context, cross_frame=CrossFrame(f, levels=[1, 0])), everywhere)  # all = None


def test_unet_compiles_as_one_graph(tiny):
    """`torch.compile` of the UNet (benchmark.py compile=true, python -m t2vz compile=true) traces the whole forward,
    cross-frame attention and the shared text context included, without graph breaks (each would fall back to
    eager Python between compiled pieces)."""
    from t2vz.sd.attention import CrossFrame

    _, ours = tiny
    x, context = torch.randn(6, 4, 8, 8), torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    torch._dynamo.mark_dynamic(x, 0)  # as after the first recompile: frame-1-only calls have 2 rows, later ones 2·f
    torch._dynamo.mark_dynamic(context, 0)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(ours)(x, torch.tensor(500), context, cross_frame=CrossFrame(3))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

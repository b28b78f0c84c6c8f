"""ControlNet parity with diffusers' ControlNetModel, and UNet + ControlNet residuals with UNet2DConditionModel
(copied, perturbed weights: the zero convolutions are moved off zero), fp32, tolerance: conftest.PARITY_RTOL."""
import sys

import pytest
import torch
from conftest import assert_parity
from reference_models import TINY_CONTROLNET, TINY_UNET, diffusers_controlnet, diffusers_unet

from t2vz.sd.attention import CrossFrame
from t2vz.sd.controlnet import ControlNet, ControlNetConfig
from t2vz.sd.loading import build_loaded
from t2vz.sd.unet import UNet


@pytest.fixture(scope="module")
def tiny():
    ref = diffusers_controlnet(TINY_CONTROLNET, seed=3)
    return ref, build_loaded(ControlNet, TINY_CONTROLNET, ref.state_dict()).eval()


def inputs(n: int, h: int = 8, w: int = 12, rows_of_context: int | None = None):
    """Noisy latents, text context and a [0, 1] control image at 8× the latent size."""
    x = torch.randn(n, 4, h, w)
    context = torch.randn(rows_of_context or n, 77, TINY_CONTROLNET.cross_attention_dim)
    control = torch.rand(n, 3, 8 * h, 8 * w)
    return x, context, control


def assert_residuals_match(ours, ref_down, ref_mid):
    down, mid = ours
    assert len(down) == len(ref_down) == 6  # conv_in + 2 levels · (2 resnets) + 1 downsampler
    for d, r in zip(down, ref_down):
        assert_parity(d, r)
    assert_parity(mid, ref_mid)


def test_sd15_shapes_are_diffusers_keys_and_shapes():
    """The default (SD 1.5) ControlNet has diffusers' keys and shapes exactly (built on the meta device: no weights)."""
    from diffusers import ControlNetModel

    cfg = ControlNetConfig()
    assert cfg.control_downscale == 8
    with torch.device("meta"):
        ours = ControlNet(cfg).state_dict()
        ref = ControlNetModel(cross_attention_dim=cfg.cross_attention_dim).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert sum(v.numel() for v in ours.values()) == 361_279_120  # equal shapes, so diffusers' count too


@pytest.mark.parametrize("scale", [1.0, 0.5])
@torch.no_grad()
def test_tiny_controlnet_matches_diffusers(tiny, scale):
    ref, ours = tiny
    x, context, control = inputs(2)  # non-square latent
    t = torch.tensor([981, 17])
    expected = ref(x, t, context, control, conditioning_scale=scale, return_dict=False)
    assert_residuals_match(ours(x, t, context, control, conditioning_scale=scale), *expected)


@torch.no_grad()
def test_unet_with_controlnet_residuals_matches_diffusers(tiny):
    """Each model's own ControlNet residuals, added by each UNet: ε with control matches end to end."""
    ref, ours = tiny
    ref_unet = diffusers_unet(TINY_UNET, seed=4)
    our_unet = build_loaded(UNet, TINY_UNET, ref_unet.state_dict()).eval()
    x, context, control = inputs(2)
    ref_down, ref_mid = ref(x, 500, context, control, conditioning_scale=0.7, return_dict=False)
    expected = ref_unet(x, 500, context, down_block_additional_residuals=ref_down,
                        mid_block_additional_residual=ref_mid).sample
    down, mid = ours(x, 500, context, control, conditioning_scale=0.7)
    actual = our_unet(x, 500, context, down_residuals=down, mid_residual=mid)
    assert_parity(actual, expected)
    plain = our_unet(x, 500, context)
    assert (actual - plain).abs().max() > 1e-2 * plain.abs().max()  # the residuals do change ε
    assert_parity(our_unet(x, 500, context, down_residuals=[d * 0 for d in down], mid_residual=mid * 0), plain)
    with pytest.raises(ValueError, match="5 down residuals for a UNet with 6 skips"):
        our_unet(x, 500, context, down_residuals=down[:5], mid_residual=mid)


@torch.no_grad()
def test_cross_frame_controlnet_matches_diffusers_cross_frame_processor(tiny):
    """With cross_frame, every attn1 of the copied encoder is T2V-Zero's first-frame attention, as diffusers'
    CrossFrameAttnProcessor2_0 makes it; the context comes one row per video (diffusers: repeated per frame)."""
    from diffusers import TextToVideoZeroPipeline

    CrossFrameAttnProcessor2_0 = sys.modules[TextToVideoZeroPipeline.__module__].CrossFrameAttnProcessor2_0
    ref, ours = tiny
    f = 3
    x, context, control = inputs(2 * f, h=8, w=8, rows_of_context=2)
    original = ref.attn_processors
    ref.set_attn_processor(CrossFrameAttnProcessor2_0(batch_size=2))
    try:
        expected = ref(x, 500, context.repeat_interleave(f, dim=0), control, return_dict=False)
    finally:
        ref.set_attn_processor(original)
    actual = ours(x, 500, context, control, cross_frame=CrossFrame(f))
    assert_residuals_match(actual, *expected)
    per_frame = ours(x, 500, context.repeat_interleave(f, dim=0), control)  # cross-frame attention does matter
    assert (per_frame[1] - actual[1]).abs().max() > 1e-3 * actual[1].abs().max()
    with pytest.raises(ValueError, match="context has 4 rows for a batch of 6"):
        ours(x, 500, torch.randn(4, 77, TINY_CONTROLNET.cross_attention_dim), control)


@torch.no_grad()
def test_control_image_not_8x_the_latent_is_rejected(tiny):
    _, ours = tiny
    x, context, _ = inputs(1, h=8, w=12)
    with pytest.raises(ValueError, match=r"control image is 64×64 px for a 8×12 latent.*8×.*64×96 px"):
        ours(x, 500, context, torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="control has 2 images for a batch of 1"):
        ours(x, 500, context, torch.rand(2, 3, 64, 96))


def test_controlnet_compiles_as_one_graph(tiny):
    """As the UNet (test_unet.py): the whole forward, cross-frame attention and input checks included, traces without
    graph breaks when the batch is dynamic (latents, context and control images alike)."""
    _, ours = tiny
    x, context, control = inputs(6, h=8, w=8, rows_of_context=2)
    for tensor in (x, context, control):
        torch._dynamo.mark_dynamic(tensor, 0)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(ours)(x, torch.tensor(500), context, control, 0.5, cross_frame=CrossFrame(3))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

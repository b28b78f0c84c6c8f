"""The attention module's modes: self/cross attention vs diffusers' Attention, and cross-frame attention
(T2V-Zero Eq. 8) against its explicit formulation (K, V of the anchor frame repeated for every frame)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_parity, perturb_
from einops import rearrange

from t2vz.sd.attention import Attention, CrossFrame, Transformer2D, at_level, check_cross_frame_levels, memory_layout


def explicit(attn: Attention, x: torch.Tensor, f: int, anchors) -> torch.Tensor:
    """Per frame k: softmax(Q^k [K^a for a in anchors(k)]ᵀ/√d) [V^a ...], computed frame by frame."""
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    out = []
    for i in range(x.shape[0]):
        video, frame = divmod(i, f)
        rows = [video * f + a for a in anchors(frame)]
        keys, values = torch.cat([k[r] for r in rows]), torch.cat([v[r] for r in rows])
        heads = attn.heads
        qh, kh, vh = (rearrange(t, "n (h d) -> h n d", h=heads) for t in (q[i], keys, values))
        o = F.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1) @ vh
        out.append(rearrange(o, "h n d -> n (h d)"))
    return attn.to_out[0](torch.stack(out))


@pytest.fixture
def attn():
    return perturb_(Attention(32, heads=4, dim_head=8)).eval()


@torch.no_grad()
def test_matches_diffusers_attention():
    from diffusers.models.attention_processor import Attention as Reference

    ref = perturb_(Reference(32, cross_attention_dim=24, heads=4, dim_head=8)).eval()
    ours = Attention(32, heads=4, dim_head=8, context_dim=24).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(3, 10, 32), torch.randn(3, 7, 24)
    assert_parity(ours(x, context=ctx), ref(x, encoder_hidden_states=ctx))


@pytest.mark.parametrize("videos,f", [(1, 1), (1, 5), (3, 4)])
@torch.no_grad()
def test_first_frame_equals_explicit_repeat(attn, videos, f):
    x = torch.randn(videos * f, 6, 32)
    ours = attn(x, cross_frame=CrossFrame(f, "first"))
    assert_parity(ours, explicit(attn, x, f, lambda k: [0]))
    # frame 1 of each video is plain self-attention
    assert_parity(ours[::f], attn(x[::f]))


@torch.no_grad()
def test_sparse_causal_equals_explicit(attn):
    f = 4
    x = torch.randn(2 * f, 6, 32)
    ours = attn(x, cross_frame=CrossFrame(f, "first+previous"))
    assert_parity(ours, explicit(attn, x, f, lambda k: [0, max(k - 1, 0)]))


@torch.no_grad()
def test_off_is_per_frame_self_attention(attn):
    x = torch.randn(6, 5, 32)
    per_frame = torch.cat([attn(x[i : i + 1]) for i in range(6)])
    assert_parity(attn(x, cross_frame=CrossFrame(3, "off")), per_frame)
    assert not torch.allclose(attn(x, cross_frame=CrossFrame(3, "first")), per_frame)


def test_bad_modes():
    with pytest.raises(ValueError, match="'last'"):
        CrossFrame(4, "last")
    with pytest.raises(ValueError, match="num_frames must be >= 1, got 0"):
        CrossFrame(0)
    for levels in ([], [-1], [0, 0], [0.5], [True]):
        with pytest.raises(ValueError, match="must be distinct UNet levels"):
            CrossFrame(4, levels=levels)
    assert CrossFrame(4, levels=[2, 0]).levels == (0, 2)
    assert at_level(CrossFrame(4, levels=[2, 0]), 1) is None and at_level(CrossFrame(4), 1) == CrossFrame(4)


def test_batch_must_hold_whole_videos(attn):
    with pytest.raises(ValueError, match="batch of 7 frames is not a whole number of videos of 4 frames"):
        attn(torch.randn(7, 5, 32), cross_frame=CrossFrame(4))


@torch.no_grad()
def test_shared_text_context_equals_repeated_context():
    """One context row per video (its frames share the prompt) gives what the context repeated per frame gives:
    K and V are projected once per video, and folding the video's queries into one sequence changes nothing."""
    attn = perturb_(Attention(32, heads=4, dim_head=8, context_dim=24)).eval()
    x, ctx = torch.randn(2 * 3, 10, 32), torch.randn(2, 7, 24)
    per_row = attn(x, context=ctx.repeat_interleave(3, dim=0))
    assert_parity(attn(x, context=ctx), per_row)
    assert not torch.allclose(per_row[:3], per_row[3:]), "the two videos' contexts must matter"
    with pytest.raises(ValueError, match="cannot share 4 text contexts"):
        attn(x, context=torch.randn(4, 7, 24))


def test_cross_frame_levels_must_have_self_attention():
    """A level without transformer blocks (the toy model's 16×16) would make the ablation a silent no-op; the
    deepest level always counts, through the mid block."""
    toy = (False, True, True)
    with pytest.raises(ValueError, match=r"cross_frame_levels=\[0\]: this UNet has self-attention only at levels \[1, 2\]"):
        check_cross_frame_levels([0], "first", toy)
    with pytest.raises(ValueError, match=r"this UNet has levels 0..2"):
        check_cross_frame_levels([3], "first", toy)
    check_cross_frame_levels([1, 2], "first", toy)
    check_cross_frame_levels([1], "first", (False, False))  # the mid block's
    check_cross_frame_levels([0], "first")  # no UNet given: only the level list and the mode are checked


@pytest.mark.parametrize("linear", [False, True], ids=["conv-projections", "linear-projections"])
@pytest.mark.parametrize("dtype, layout", [(torch.float32, torch.contiguous_format),
                                           (torch.bfloat16, torch.channels_last)])
@torch.no_grad()
def test_transformer_hands_on_the_layout_it_was_given(linear, dtype, layout):
    """The transformer returns its input's layout (NCHW, or channels-last as t2vz runs CPU bf16/fp16,
    `sd.loading.channels_last_for`), and its 1×1 `proj_out` conv (SD 1.5) sees that layout too. With linear
    projections (SDXL) the tokens folded back to (b, c, h, w) are an NHWC-strided view, and an fp32 NCHW model's
    transformer returned it channels-last (strides (960, 1, 160, 32) here), which cuDNN then carries on."""
    model = perturb_(Transformer2D(32, heads=4, context_dim=16, groups=8, linear=linear)).eval().to(dtype)
    model.to(memory_format=layout)
    x = torch.randn(2, 32, 6, 5, dtype=dtype).contiguous(memory_format=layout)  # h ≠ w: the strides tell them apart
    seen = []
    model.proj_out.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = model(x, torch.randn(2, 7, 16, dtype=dtype))
    assert out.is_contiguous(memory_format=layout) and out.stride() == x.stride(), out.stride()
    if not linear:
        assert seen[0].is_contiguous(memory_format=layout), seen[0].stride()
    assert memory_layout(out) == layout

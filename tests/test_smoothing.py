"""Background smoothing (T2V-Zero Sec. 3.3): the blend, its two forms, the attention-map mask source, and the
pipeline with smoothing on."""
import pytest
import torch
from conftest import OpNames, assert_parity
from reference_models import TINY_UNET, tiny_reference_folder

from t2vz import TextToVideoZero
from t2vz.method.motion import translation_path
from t2vz.method.smoothing import (
    CrossAttentionMaps, blend_background, dilate, masks_from_maps, smooth_video, token_positions,
)
from t2vz.sd.text_encoder import load_tokenizer


def test_blend_keeps_foreground_and_mixes_background():
    x, warped = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    mask = torch.zeros(2, 1, 6, 6)
    mask[..., :3, :] = 1
    out = blend_background(x, warped, mask, alpha=0.6)
    assert torch.equal(out[..., :3, :], x[..., :3, :])
    torch.testing.assert_close(out[..., 3:, :], 0.6 * warped[..., 3:, :] + 0.4 * x[..., 3:, :])


@pytest.mark.parametrize("form", ["paper", "authors"])
def test_smooth_video_frame_one_and_full_foreground_untouched(form):
    x = torch.randn(2, 4, 3, 8, 8)
    path = translation_path(range(3), 64.0, (1.0, 0.0))
    out = smooth_video(x, torch.ones(2, 3, 8, 8), path, 0.6, form)
    assert torch.equal(out, x)
    out = smooth_video(x, torch.zeros(2, 3, 8, 8), path, 0.6, form)
    assert torch.equal(out[:, :, 0], x[:, :, 0]) and not torch.allclose(out[:, :, 1:], x[:, :, 1:])


def test_authors_form_background_is_outside_both_dilated_masks():
    x = torch.randn(1, 4, 2, 16, 16)
    fg = torch.zeros(1, 2, 16, 16)
    fg[0, 1, 8, 8] = 1  # one foreground pixel in frame 2; frame 1 has none
    path = translation_path(range(2), 0.0)
    out = smooth_video(x, fg, path, 1.0, "authors")
    near = dilate(fg[:, 1:2])[0, 0].bool()  # the 5×5 square around (8, 8)
    assert near.sum() == 25
    assert torch.equal(out[0, :, 1][:, near], x[0, :, 1][:, near])  # foreground after dilation: kept
    assert not torch.allclose(out[0, :, 1][:, ~near], x[0, :, 1][:, ~near])  # background: replaced (α = 1)


def test_token_positions():
    tok = load_tokenizer()
    assert token_positions(tok, "a horse galloping", None) == [1, 2, 3, 4]  # "galloping" is two BPE tokens
    assert token_positions(tok, "a horse galloping", "horse") == [2]
    assert token_positions(tok, "a horse galloping", "galloping horse") == [2, 3, 4]
    with pytest.raises(ValueError, match="mask token 'zebra' does not occur in the prompt 'a horse'"):
        token_positions(tok, "a horse", "zebra")


def test_masks_from_maps_threshold():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    assert masks_from_maps(maps).tolist() == [[[0.0, 0.0], [1.0, 1.0]]]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return TextToVideoZero.from_pretrained(tiny_reference_folder(tmp_path_factory.mktemp("m") / "tiny")[0])


@torch.no_grad()
def test_attention_maps_are_probabilities(pipe):
    """Over all 77 tokens the recorded attention averages to exactly 1/77 at every pixel (softmax over tokens)."""
    unet = pipe.sd.unet
    x, context = torch.randn(2, 4, 8, 12), torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    with CrossAttentionMaps(unet, [list(range(77))], (8, 12), slice(1, 2)) as maps:
        unet(x, 500, context)
    assert maps.count == 2 + 1 + 3  # tiny UNet, attention at level 0 only: 2 down, 1 mid, 3 up transformers
    torch.testing.assert_close(maps.mean(), torch.full((1, 8, 12), 1 / 77))
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.recorder is None  # detached on exit


COMMON = dict(num_frames=4, height=32, width=32, num_inference_steps=8, t0=1, t1=3, progress=False)


@pytest.mark.parametrize("form", ["paper", "authors"])
@torch.no_grad()
def test_pipeline_full_foreground_or_alpha_zero_is_unsmoothed(pipe, form):
    plain = pipe("a horse", generator=torch.Generator().manual_seed(0), **COMMON)
    ones = torch.ones(4, 32, 32)
    kept = pipe("a horse", smooth_bg=True, smoothing=form, masks=ones, generator=torch.Generator().manual_seed(0),
                **COMMON)
    assert torch.equal(kept, plain)
    smoothed = pipe("a horse", smooth_bg=True, smoothing=form, masks=torch.zeros(4, 32, 32),
                    generator=torch.Generator().manual_seed(0), **COMMON)
    assert torch.equal(smoothed[0], plain[0]) and not torch.allclose(smoothed[1:], plain[1:])
    if form == "paper":
        none = pipe("a horse", smooth_bg=True, alpha=0.0, masks=torch.zeros(4, 32, 32),
                    generator=torch.Generator().manual_seed(0), **COMMON)
        assert torch.equal(none, plain)


@torch.no_grad()
def test_pipeline_attention_masks_and_chunks(pipe):
    """Masks from cross-attention to "horse"; chunked generation with per-step smoothing equals unchunked."""
    kwargs = dict(smooth_bg=True, mask_tokens="horse", **COMMON)
    full = pipe("a horse", generator=torch.Generator().manual_seed(1), **kwargs)
    plain = pipe("a horse", generator=torch.Generator().manual_seed(1), **COMMON)
    assert full.shape == plain.shape and not torch.allclose(full[1:], plain[1:])
    chunked = pipe("a horse", generator=torch.Generator().manual_seed(1), chunk_size=3, **kwargs)
    assert_parity(chunked, full)


def test_bad_smoothing_arguments(pipe):
    with pytest.raises(ValueError, match="smoothing='blur' must be one of"):
        pipe("a horse", smooth_bg=True, smoothing="blur", **COMMON)
    with pytest.raises(ValueError, match="alpha=1.5 in \\[0, 1\\]"):
        pipe("a horse", smooth_bg=True, alpha=1.5, **COMMON)


def test_attention_masks_record_through_a_compiled_unet():
    """With compile=true the UNet is torch.compile'd; the cross-attention recorder, set on its modules after
    compilation, still sees every call, and the frames equal eager ones. Dynamo's "eager" backend traces as the
    real one does, without code generation, so this stays fast (two generations: tests/test_compile.py)."""
    from t2vz.experiment.run import load_pipeline

    assert isinstance(load_pipeline("toyworld", "cpu", "fp32", compile_unet=True).sd.unet,
                      torch._dynamo.eval_frame.OptimizedModule)
    eager = load_pipeline("toyworld", "cpu", "fp32")
    compiled = load_pipeline("toyworld", "cpu", "fp32")
    wrapper = compiled.sd.unet = torch.compile(compiled.sd.unet, backend="eager")
    kwargs = dict(num_frames=2, num_inference_steps=2, t0=0, t1=1, smooth_bg=True, progress=False)
    frames = compiled("a red circle on grass", generator=torch.Generator().manual_seed(0), **kwargs)
    assert compiled.sd.unet is wrapper
    reference = eager("a red circle on grass", generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(frames, reference, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_recording_builds_its_tensors_once_and_indexes_nothing(pipe):
    """The token positions become averaging weights on the UNet's device when the recorder is first entered, so a
    recorded call indexes nothing by a Python list (torch would build each such index on the host and copy it to
    the device, in every layer at every step: aten::index, as the recorder did before). One recorder at a time."""

    unet = pipe.sd.unet
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    maps = CrossAttentionMaps(unet, [[1, 2], [3]], (8, 8), slice(0, 2))
    with maps:
        unet(x, 500, context)
    weights = maps.weights
    with OpNames() as ops, maps:
        unet(x, 500, context)
    assert maps.weights is weights and maps.count == 2 * 6
    assert not [name for name in ops.names if name.startswith("aten::index")], sorted(set(ops.names))
    with maps, pytest.raises(RuntimeError, match="already recording"):
        CrossAttentionMaps(unet, [[1]], (8, 8), slice(0, 1)).__enter__()

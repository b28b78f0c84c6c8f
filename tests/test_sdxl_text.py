"""SDXL's two text encoders (`SDXLTextEncoders`) against diffusers' `StableDiffusionXLPipeline.encode_prompt` on the
same transformers modules, and SDXL's second tokenizer (pads with "!") against a CLIPTokenizer built that way."""
from __future__ import annotations

import gc

import pytest
import torch
from conftest import assert_parity
from reference_models import perturb_

from t2vz.sd.text_encoder import (
    SDXL_TOKENIZER_2_CONFIG, SDXLTextEncoders, TextEncoder, build_clip_text_model, load_sdxl_tokenizer_2,
    load_tokenizer, shipped_tokenizer_dir,
)

# different widths, so that a swapped concatenation or pooled source cannot pass
TINY_CLIP_L = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)
TINY_BIGG = dict(vocab_size=49408, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=24)
# stabilityai/stable-diffusion-xl-base-1.0 text_encoder/ and text_encoder_2/ config.json
SDXL_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                   projection_dim=768)
SDXL_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                 projection_dim=1280)
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, highly detailed, 8k"]
LONG = " ".join(["a red fox jumping over a lazy dog"] * 12)  # over 77 tokens: truncated


def encoders(clip_l: dict = TINY_CLIP_L, bigg: dict = TINY_BIGG) -> SDXLTextEncoders:
    enc_1 = perturb_(build_clip_text_model(clip_l), 1, scale=0.02).eval()
    enc_2 = perturb_(build_clip_text_model(bigg, projection=True), 2, scale=0.02).eval()
    return SDXLTextEncoders(enc_1, enc_2, load_tokenizer(), load_sdxl_tokenizer_2())


def reference_pipeline(ours: SDXLTextEncoders, force_zeros: bool = True):
    """diffusers' SDXL pipeline around the same text modules; a CLIPTokenizer padding with "!" built here."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tokenizer_2 = CLIPTokenizer.from_pretrained(str(shipped_tokenizer_dir()), pad_token="!", model_max_length=77)
    return StableDiffusionXLPipeline(
        vae=None, text_encoder=ours.encoder_1, text_encoder_2=ours.encoder_2, tokenizer=load_tokenizer(),
        tokenizer_2=tokenizer_2, unet=None, scheduler=None, force_zeros_for_empty_prompt=force_zeros,
    )


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return encoders()


@pytest.mark.parametrize("prompts_2", [None, ["oil painting", LONG]])
@torch.no_grad()
def test_context_and_pooled_equal_diffusers_encode_prompt(tiny, prompts_2):
    context, pooled = tiny(PROMPTS, prompts_2)
    ref, _, ref_pooled, _ = reference_pipeline(tiny).encode_prompt(
        PROMPTS, prompt_2=prompts_2, device="cpu", do_classifier_free_guidance=False)
    assert context.shape == (2, 77, 32 + 48) and pooled.shape == (2, 24)
    assert_parity(context, ref)
    assert_parity(pooled, ref_pooled)


@torch.no_grad()
def test_context_is_both_penultimate_states_and_pooled_the_projection(tiny):
    """The definition itself: hidden_states[-2] of each (no final layer norm), concatenated; bigG's text_embeds."""
    context, pooled = tiny([LONG])
    ids_1 = tiny.tokenizer([LONG], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids_2 = tiny.tokenizer_2([LONG], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    out_1 = tiny.encoder_1(ids_1, output_hidden_states=True)
    out_2 = tiny.encoder_2(ids_2, output_hidden_states=True)
    assert torch.equal(context[..., :32], out_1.hidden_states[-2])
    assert torch.equal(context[..., 32:], out_2.hidden_states[-2])
    assert not torch.allclose(context[..., 32:], out_2.last_hidden_state)  # the last state is not the one taken
    assert torch.equal(pooled, out_2.text_embeds)


@pytest.mark.parametrize("negative, negative_2, force_zeros", [
    (None, None, True),          # diffusers' SDXL default: zeros
    (None, None, False),         # encodes ""
    ("", None, True),            # an explicit "" is encoded, not zeroed
    ("blurry, low quality", None, True),
    ("blurry", "watermark", True),
    (["blurry", "dark"], None, True),
])
@torch.no_grad()
def test_unconditional_equals_diffusers_negative_embeddings(tiny, negative, negative_2, force_zeros):
    context, pooled = tiny.unconditional(2, negative, negative_2, force_zeros_for_empty_prompt=force_zeros)
    _, ref, _, ref_pooled = reference_pipeline(tiny, force_zeros).encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative,
        negative_prompt_2=negative_2)
    assert_parity(context, ref)
    assert_parity(pooled, ref_pooled)
    assert (context.abs().max() == 0) == (negative is None and force_zeros)


def test_prompt_counts_must_agree(tiny):
    with pytest.raises(ValueError, match="prompts_2 has 1 prompts and prompts 2"):
        tiny(PROMPTS, ["one"])
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        tiny.unconditional(2, ["a", "b", "c"])


def test_second_tokenizer_pads_with_exclamation_mark():
    from transformers import CLIPTokenizer

    ours = load_sdxl_tokenizer_2()
    ref = CLIPTokenizer.from_pretrained(str(shipped_tokenizer_dir()), pad_token="!", model_max_length=77)
    for text in ["", "a photo of a cat!", LONG, "Ünïcode & emoji 🙂"]:
        kw = dict(padding="max_length", max_length=77, truncation=True)
        assert ours(text, **kw).input_ids == ref(text, **kw).input_ids
    ids = ours("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[7:] == [0] * 70  # "!" is id 0
    first = load_tokenizer()("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert first[7:] == [49407] * 70  # the first tokenizer pads with <|endoftext|>
    assert SDXL_TOKENIZER_2_CONFIG["pad_token"] == "!"


def test_second_tokenizer_from_a_folder_reads_its_config(tmp_path):
    import json
    import shutil

    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(shipped_tokenizer_dir() / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(SDXL_TOKENIZER_2_CONFIG))
    ids = load_sdxl_tokenizer_2(tmp_path)("cat", padding="max_length", max_length=77).input_ids
    assert ids == load_sdxl_tokenizer_2()("cat", padding="max_length", max_length=77).input_ids and ids[-1] == 0


@torch.no_grad()
def test_sd15_text_encoder_unchanged():
    """TextEncoder (SD 1.5) still returns the last hidden state (final layer norm included) as one tensor."""
    clip = perturb_(build_clip_text_model(TINY_CLIP_L), 3, scale=0.02).eval()
    out = TextEncoder(clip, load_tokenizer())(PROMPTS)
    ids = load_tokenizer()(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(out, clip(ids.input_ids).last_hidden_state)


@pytest.mark.full
@torch.no_grad()
def test_full_sdxl_text_encoders_shapes_and_parity():
    """SDXL's real text encoders (CLIP ViT-L 123M, OpenCLIP bigG 695M parameters), randomly initialised: output
    shapes (b, 77, 2048) and (b, 1280), and parity with diffusers' encode_prompt on the same modules."""
    torch.manual_seed(0)
    ours = SDXLTextEncoders(build_clip_text_model(SDXL_CLIP_L).eval(),
                            build_clip_text_model(SDXL_BIGG, projection=True).eval(),
                            load_tokenizer(), load_sdxl_tokenizer_2())
    params = [sum(p.numel() for p in m.parameters()) for m in (ours.encoder_1, ours.encoder_2)]
    assert round(params[0] / 1e6) == 123 and round(params[1] / 1e6) == 695, params
    context, pooled = ours(PROMPTS)
    assert context.shape == (2, 77, 2048) and pooled.shape == (2, 1280)
    ref, _, ref_pooled, _ = reference_pipeline(ours).encode_prompt(PROMPTS, device="cpu",
                                                                   do_classifier_free_guidance=False)
    assert_parity(context, ref)
    assert_parity(pooled, ref_pooled)
    del ours, ref, ref_pooled
    gc.collect()

"""weights_convert on SDXL base checkpoints: SGM single files checked tensor for tensor against diffusers' own
single-file converter, diffusers folders round trip, the refiner and inpainting refused by name, and `t2vz.load`
of the result computing what diffusers and transformers compute."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_parity
from ldm_fixtures import write_checkpoint
from reference_models import sdxl_added_cond
from safetensors.torch import load_file
from sdxl_fixtures import (
    OPEN_CLIP, TINY_SDXL_BIGG, TINY_SDXL_CLIP_L, TINY_SDXL_FILE_UNET, TINY_SDXL_VAE, tiny_sdxl_checkpoint,
    tiny_sdxl_models, tiny_sdxl_state_dicts, write_sdxl_diffusers_folder,
)
from test_convert import assert_same as assert_same_components

import t2vz
from t2vz.sd.model_folder import read_model_config
from t2vz.sd.text_encoder import SDXLTextEncoders, shipped_tokenizer_dir
from weights_convert import ConversionError, convert
from weights_convert.__main__ import DESCRIPTION, main

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def read_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def diffusers_reference(path: Path, unet_config, vae_config, bigg) -> dict:
    """diffusers' single-file converter on the same file (its CLIP-L output keeps position_ids; its OpenCLIP
    conversion splits in_proj by the text width and transposes text_projection)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    ckpt = read_file(path)
    return {
        "unet": convert_ldm_unet_checkpoint(ckpt, unet_config),
        "vae": convert_ldm_vae_checkpoint(ckpt, vae_config),
        "text_encoder": {k: v for k, v in convert_ldm_clip_checkpoint(ckpt).items() if not k.endswith("position_ids")},
        "text_encoder_2": convert_open_clip_checkpoint(bigg, ckpt, prefix=OPEN_CLIP),
    }


def assert_same(out: Path, reference: dict, dtype: torch.dtype) -> None:
    """Every SDXL component equal to the reference, tensor for tensor, in `dtype` (test_convert's check)."""
    assert_same_components(out, reference, dtype, COMPONENTS)


@pytest.fixture(scope="module")
def tiny():
    return tiny_sdxl_models()


@pytest.mark.parametrize("suffix, file_dtype, out_dtype", [(".safetensors", torch.float32, "fp32"),
                                                           (".ckpt", torch.float16, "fp32"),
                                                           (".safetensors", torch.float16, "fp16")])
def test_single_file_matches_diffusers_converter(tmp_path, tiny, suffix, file_dtype, out_dtype):
    src = write_checkpoint(tiny_sdxl_checkpoint(dtype=file_dtype), tmp_path / f"sd_xl{suffix}")
    report = convert(src, tmp_path / "out", dtype=out_dtype)
    unet, vae, _, bigg = tiny
    to = {"fp32": torch.float32, "fp16": torch.float16}[out_dtype]
    assert_same(tmp_path / "out", diffusers_reference(src, unet.config, vae.config, bigg), to)
    meta = read_model_config(tmp_path / "out")
    assert meta["family"] == "sdxl" and meta["sample_size"] == 1024 and meta["variant"] == "sdxl"
    assert meta["unet"] == json.loads(json.dumps(dataclasses.asdict(TINY_SDXL_FILE_UNET)))
    assert meta["vae"] == json.loads(json.dumps(dataclasses.asdict(TINY_SDXL_VAE)))
    assert meta["vae"]["scaling_factor"] == 0.13025
    assert meta["text_encoder"] == TINY_SDXL_CLIP_L and meta["text_encoder_2"] == TINY_SDXL_BIGG
    assert meta["source"]["dtype"] == str(file_dtype).removeprefix("torch.")
    assert set(report.parameters) == set(COMPONENTS) and "tokenizer_2" in str(report)


def test_diffusers_folder_round_trip(tmp_path, tiny):
    src = write_sdxl_diffusers_folder(tmp_path / "sdxl", *tiny)
    convert(src, tmp_path / "out")
    unet, vae, clip_l, bigg = tiny_sdxl_state_dicts()
    assert_same(tmp_path / "out", {"unet": unet, "vae": vae, "text_encoder": clip_l, "text_encoder_2": bigg},
                torch.float32)
    meta = read_model_config(tmp_path / "out")
    assert meta["family"] == "sdxl" and meta["unet"] == json.loads(json.dumps(dataclasses.asdict(TINY_SDXL_FILE_UNET)))
    assert meta["text_encoder_2"] == TINY_SDXL_BIGG and meta["vae"]["scaling_factor"] == 0.13025
    assert json.loads((tmp_path / "out" / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"
    assert json.loads((tmp_path / "out" / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] == \
        "<|endoftext|>"


def test_diffusers_folder_heads_other_than_64_channels(tmp_path):
    """A folder states its heads (the reference TINY_SDXL_UNET: 32- and 16-channel heads), a file cannot."""
    from reference_models import TINY_SDXL_POOLED_DIM, TINY_SDXL_UNET

    bigg = dict(TINY_SDXL_BIGG, hidden_size=16, intermediate_size=32, projection_dim=TINY_SDXL_POOLED_DIM)
    clip_l = dict(TINY_SDXL_CLIP_L, hidden_size=16, intermediate_size=32)
    torch.manual_seed(0)
    from reference_models import diffusers_sdxl_unet, diffusers_vae

    from t2vz.sd.text_encoder import build_clip_text_model
    models = (diffusers_sdxl_unet(TINY_SDXL_UNET), diffusers_vae(TINY_SDXL_VAE), build_clip_text_model(clip_l),
              build_clip_text_model(bigg, projection=True))
    convert(write_sdxl_diffusers_folder(tmp_path / "sdxl", *models), tmp_path / "out")
    assert read_model_config(tmp_path / "out")["unet"]["num_attention_heads"] == [1, 2, 4]
    sd = t2vz.load(tmp_path / "out")
    assert sd.unet.down_blocks[2].attentions[0].transformer_blocks[0].attn1.heads == 4


def sgm_file(tmp_path: Path, edit=None) -> Path:
    sd = tiny_sdxl_checkpoint()
    if edit:
        edit(sd)
    return write_checkpoint(sd, tmp_path / "model.safetensors")


def _refiner(sd: dict) -> None:
    """SDXL refiner's text side: bigG alone, as embedder 0."""
    for k in [k for k in sd if k.startswith("conditioner.embedders.")]:
        v = sd.pop(k)
        if k.startswith(OPEN_CLIP):
            sd[k.replace("embedders.1.", "embedders.0.")] = v


def _refiner_unet(sd: dict) -> None:
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(384, *w.shape[1:])


def _inpainting(sd: dict) -> None:
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, *w.shape[2:])


@pytest.mark.parametrize("edit, message", [
    (_refiner, r"is the Stable Diffusion XL refiner \(a single OpenCLIP text encoder, conditioner\.embedders\.0\."
               r"model\.\*, 80-wide label_emb\).*; t2vz takes the SDXL base model"),
    (_refiner_unet, r"is the Stable Diffusion XL refiner \(a 384-channel UNet, 80-wide label_emb\)"),
    (_inpainting, r"is Stable Diffusion XL inpainting \(UNet with 9 input channels.*t2vz takes the SDXL base model"),
    (lambda sd: sd.pop(OPEN_CLIP + "transformer.resblocks.1.attn.in_proj_weight"),
     r"does not match an SDXL base model: 3 missing keys: conditioner\.embedders\.1\.model\.transformer\.resblocks\.1"
     r"\.attn\.in_proj_weight"),
    (lambda sd: sd.pop(OPEN_CLIP + "token_embedding.weight"),
     r"has no conditioner\.embedders\.1\.model\.token_embedding\.weight, which gives the second text encoder"),
    (lambda sd: sd.update({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(128 * 4, 90)}),
     r"label_emb takes 90 features, not a 32-wide pooled text embedding and 6 size/crop sinusoids"),
    (lambda sd: sd.update({"conditioner.embedders.1.model.extra": torch.zeros(3)}),
     r"1 unexpected keys: conditioner\.embedders\.1\.model\.extra"),
])
def test_refusals_of_single_files(tmp_path, edit, message):
    with pytest.raises(ConversionError, match=message):
        convert(sgm_file(tmp_path, edit), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _edit_json(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _refiner_folder(p: Path) -> None:
    import shutil
    shutil.rmtree(p / "text_encoder")
    shutil.rmtree(p / "tokenizer")


@pytest.mark.parametrize("edit, message", [
    (_refiner_folder, r"is the Stable Diffusion XL refiner \(text_encoder_2/ without text_encoder/, a 64-channel "
                      r"UNet\).*t2vz takes the SDXL base model"),
    (lambda p: _edit_json(p / "unet" / "config.json", in_channels=9), r"is Stable Diffusion XL inpainting"),
    (lambda p: (p / "text_encoder_2" / "config.json").unlink(), r"Stable Diffusion XL folder without "
                                                                r"text_encoder_2/config\.json"),
    (lambda p: _edit_json(p / "unet" / "config.json", reverse_transformer_layers_per_block=[[3, 3, 3]] * 3),
     r"describes a model t2vz does not build: \{'reverse_transformer_layers_per_block'"),
])
def test_refusals_of_diffusers_folders(tmp_path, tiny, edit, message):
    src = write_sdxl_diffusers_folder(tmp_path / "sdxl", *tiny)
    edit(src)
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "out")


def test_sdxl_controlnet_stays_refused(tmp_path):
    sd = {"control_model." + k.removeprefix("model.diffusion_model."): v for k, v in tiny_sdxl_checkpoint().items()
          if k.startswith("model.diffusion_model.")}
    with pytest.raises(ConversionError, match=r"Stable Diffusion XL ControlNet"):
        convert(write_checkpoint(sd, tmp_path / "cn.safetensors"), tmp_path / "out")


def test_cli_converts_sdxl_and_says_so(tmp_path, capsys):
    assert "SDXL" in DESCRIPTION
    src = write_checkpoint(tiny_sdxl_checkpoint(), tmp_path / "sd_xl.safetensors")
    assert main([str(src), str(tmp_path / "out"), "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "variant sdxl" in out and "text_encoder_2" in out and 'padding with "!"' in out


@torch.no_grad()
def test_loaded_sdxl_computes_what_diffusers_and_transformers_compute(tmp_path, tiny):
    """t2vz.load of a converted file: UNet (with the added embedding), VAE and both text encoders against the
    diffusers/transformers modules the file was made from."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    src = write_checkpoint(tiny_sdxl_checkpoint(), tmp_path / "sd_xl.safetensors")
    convert(src, tmp_path / "out")
    sd = t2vz.load(tmp_path / "out")
    ref_unet, ref_vae, ref_l, ref_g = tiny
    assert sd.family == "sdxl" and sd.sample_size == 1024 and isinstance(sd.text_encoder, SDXLTextEncoders)
    assert sd.vae.config.scaling_factor == 0.13025

    prompts = ["a photo of a cat", "a fox in the snow"]
    context, pooled = sd.text_encoder(prompts)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(shipped_tokenizer_dir()), pad_token="!", model_max_length=77)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=ref_l, text_encoder_2=ref_g,
                                     tokenizer=sd.tokenizer, tokenizer_2=tokenizer_2, unet=None, scheduler=None)
    ref_context, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert_parity(context, ref_context)
    assert_parity(pooled, ref_pooled)

    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([999, 10])
    added = sdxl_added_cond(2, TINY_SDXL_BIGG["projection_dim"])
    added["text_embeds"] = pooled
    ours = sd.unet(x, t, context, added_cond=added)
    ref = ref_unet(x, t, encoder_hidden_states=ref_context, added_cond_kwargs=added).sample
    assert_parity(ours, ref)

    z = torch.randn(1, 4, 8, 8)
    assert_parity(sd.vae.decode(z), ref_vae.decode(z).sample)


def test_model_folder_family(tmp_path, tiny):
    """"family" absent reads as sd15 (older folders load); an unknown one, or an SDXL folder missing its second
    text encoder, is a one-line ModelFolderError."""
    from t2vz.sd.model_folder import CONFIG_FILE, ModelFolderError, model_family

    assert model_family({}) == "sd15"
    convert(write_checkpoint(tiny_sdxl_checkpoint(), tmp_path / "sd_xl.safetensors"), tmp_path / "out")
    meta_file = tmp_path / "out" / CONFIG_FILE
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "family": "sd3"}))
    with pytest.raises(ModelFolderError, match=r"has family 'sd3'; this t2vz reads sd15, sdxl"):
        t2vz.load(tmp_path / "out")
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "text_encoder_2"}))
    with pytest.raises(ModelFolderError, match=r"has no 'text_encoder_2' entry"):
        t2vz.load(tmp_path / "out")
    meta_file.write_text(json.dumps(meta))
    (tmp_path / "out" / "text_encoder_2.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"text_encoder_2\.safetensors is missing"):
        t2vz.load(tmp_path / "out")


@torch.no_grad()
def test_random_sdxl_tiny_model_loads_and_runs(tmp_path):
    from weights_convert.random_model import main as random_main

    assert random_main([str(tmp_path / "m"), "--size", "sdxl-tiny"]) == 0
    sd = t2vz.load(tmp_path / "m")
    assert sd.family == "sdxl" and sd.sample_size == 1024
    context, pooled = sd.text_encoder(["a cat"])
    assert context.shape == (1, 77, 64) and pooled.shape == (1, 32)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])}
    eps = sd.unet(torch.randn(1, 4, 16, 16), torch.tensor([500]), context, added_cond=added)
    assert eps.shape == (1, 4, 16, 16) and torch.isfinite(eps).all()

"""Random tiny SDXL base checkpoints in the layouts people have: Stability's SGM single files and diffusers folders.
Test-only.

The UNet and VAE take ldm_fixtures' LDM names (the SGM UNet is openaimodel.py's, plus `label_emb`); the OpenCLIP
names of the second text encoder are written here from transformers' CLIPTextModelWithProjection (q, k, v
concatenated into in_proj, the projection transposed), independently of weights_convert/sdxl.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from ldm_fixtures import to_ldm
from reference_models import diffusers_sdxl_unet, diffusers_vae, perturb_

from t2vz.sd.text_encoder import (
    SDXL_TOKENIZER_2_CONFIG, build_clip_text_model, canonical_clip_state_dict, shipped_tokenizer_dir,
)
from t2vz.sd.unet import UNetConfig
from t2vz.sd.vae import VAEConfig

# A single file implies 64-channel heads (UNet and text encoders), so the tiny widths are multiples of 64; the
# second encoder projects to another width than its own, so a transposed projection cannot pass.
TINY_SDXL_CLIP_L = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, projection_dim=64)
TINY_SDXL_BIGG = dict(vocab_size=49408, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                      projection_dim=32)
TINY_SDXL_FILE_UNET = UNetConfig(
    block_out_channels=(64, 128, 128), attention_levels=(False, True, True), num_attention_heads=(1, 2, 2),
    transformer_layers_per_block=(1, 2, 3), cross_attention_dim=64 + 64, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
)
TINY_SDXL_VAE = VAEConfig(block_out_channels=(32, 64), scaling_factor=0.13025)
CLIP_L = "conditioner.embedders.0.transformer."
OPEN_CLIP = "conditioner.embedders.1.model."
OPEN_CLIP_LEAVES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def tiny_sdxl_models(seed: int = 0, unet_cfg: UNetConfig = TINY_SDXL_FILE_UNET):
    """Perturbed random diffusers SDXL UNet and VAE, transformers CLIPTextModel and CLIPTextModelWithProjection."""
    torch.manual_seed(seed)
    return (diffusers_sdxl_unet(unet_cfg, seed), diffusers_vae(TINY_SDXL_VAE, seed + 1),
            perturb_(build_clip_text_model(TINY_SDXL_CLIP_L), seed + 2, scale=0.02).eval(),
            perturb_(build_clip_text_model(TINY_SDXL_BIGG, projection=True), seed + 3, scale=0.02).eval())


def to_open_clip(bigg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical CLIPTextModelWithProjection keys → OpenCLIP's text tower keys (under `model.`), as SGM saves them."""
    out = {"token_embedding.weight": bigg["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": bigg["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": bigg["text_model.final_layer_norm.weight"],
           "ln_final.bias": bigg["text_model.final_layer_norm.bias"],
           "text_projection": bigg["text_projection.weight"].T.contiguous(),
           "logit_scale": torch.tensor(4.6052)}
    layers = {int(k.split(".")[3]) for k in bigg if k.startswith("text_model.encoder.layers.")}
    for n in sorted(layers):
        src, dst = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for param in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{param}"] = torch.cat([bigg[f"{src}self_attn.{p}.{param}"]
                                                          for p in ("q_proj", "k_proj", "v_proj")])
            for ours, theirs in OPEN_CLIP_LEAVES.items():
                out[f"{dst}{theirs}.{param}"] = bigg[f"{src}{ours}.{param}"]
    return {OPEN_CLIP + k: v for k, v in out.items()}


def to_sgm(unet: dict, vae: dict, clip_l: dict, bigg: dict, unet_cfg: UNetConfig, vae_cfg: VAEConfig) -> dict:
    """diffusers/transformers-named state dicts → one SGM single-file state dict (SDXL base's layout)."""
    ldm = to_ldm(unet, vae, {}, unet_cfg, vae_cfg)
    ldm = {k.replace("model.diffusion_model.add_embedding.linear_1.", "model.diffusion_model.label_emb.0.0.")
            .replace("model.diffusion_model.add_embedding.linear_2.", "model.diffusion_model.label_emb.0.2."): v
           for k, v in ldm.items() if not k.startswith("cond_stage_model.")}
    ldm.update({CLIP_L + k: v for k, v in clip_l.items()})
    ldm[CLIP_L + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ldm.update(to_open_clip(bigg))
    ldm["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)  # SGM's DiscreteDenoiser buffer, in some releases
    return ldm


def tiny_sdxl_state_dicts(seed: int = 0, unet_cfg: UNetConfig = TINY_SDXL_FILE_UNET, dtype=torch.float32):
    models = tiny_sdxl_models(seed, unet_cfg)
    sds = [m.state_dict() for m in models[:2]] + [canonical_clip_state_dict(m.state_dict()) for m in models[2:]]
    return tuple({k: v.to(dtype) for k, v in sd.items()} for sd in sds)


def tiny_sdxl_checkpoint(dtype=torch.float32, unet_cfg: UNetConfig = TINY_SDXL_FILE_UNET) -> dict:
    unet, vae, clip_l, bigg = tiny_sdxl_state_dicts(0, unet_cfg, dtype)
    return to_sgm(unet, vae, clip_l, bigg, unet_cfg, TINY_SDXL_VAE)


def write_sdxl_diffusers_folder(path: Path, unet, vae, clip_l, bigg, *, variant: str | None = None) -> Path:
    """An SDXL base folder as `save_pretrained` writes it, with both tokenizers (the second padding with "!")."""
    path = Path(path)
    unet.save_pretrained(path / "unet", variant=variant)
    vae.save_pretrained(path / "vae", variant=variant)
    clip_l.save_pretrained(path / "text_encoder")
    bigg.save_pretrained(path / "text_encoder_2")
    for tok, config in (("tokenizer", None), ("tokenizer_2", SDXL_TOKENIZER_2_CONFIG)):
        (path / tok).mkdir()
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copyfile(shipped_tokenizer_dir() / name, path / tok / name)
        if config:
            (path / tok / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
         "steps_offset": 1}))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "force_zeros_for_empty_prompt": True}))
    return path

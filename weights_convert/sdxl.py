"""Original single-file Stable Diffusion XL base checkpoints (Stability's SGM layout) → t2vz names.

`sd_xl_base_1.0.safetensors` holds four networks:

================================================  =====================================================
t2vz component                                    file prefix, naming
================================================  =====================================================
unet (UNetConfig with SDXL's fields)              model.diffusion_model.*  LDM's (openaimodel.py): ldm.py's
                                                  index rules; the added embedding label_emb.0.0 / .0.2
                                                  → add_embedding.linear_1 / linear_2
vae (scaling_factor 0.13025)                      first_stage_model.*  as SD 1.x (ldm.py)
text_encoder: CLIP ViT-L, CLIPTextModel           conditioner.embedders.0.transformer.text_model.*  (transformers'
                                                  names, as SD 1.x's cond_stage_model.transformer.)
text_encoder_2: OpenCLIP ViT-bigG,                conditioner.embedders.1.model.*  (OpenCLIP's names, below)
CLIPTextModelWithProjection
================================================  =====================================================

OpenCLIP → transformers (`text_model.` omitted on the left):

=====================================  ====================================================================
embeddings.token_embedding.weight      token_embedding.weight
embeddings.position_embedding.weight   positional_embedding
encoder.layers.N.self_attn.q/k/v_proj  transformer.resblocks.N.attn.in_proj_weight / _bias, split in three
                                       along the output axis (q, k, v)
encoder.layers.N.self_attn.out_proj    transformer.resblocks.N.attn.out_proj
encoder.layers.N.layer_norm1 / 2       transformer.resblocks.N.ln_1 / ln_2
encoder.layers.N.mlp.fc1 / fc2         transformer.resblocks.N.mlp.c_fc / c_proj
final_layer_norm                       ln_final
text_projection.weight (outside)       text_projection, transposed (OpenCLIP computes x @ P)
=====================================  ====================================================================

Configs are read off the shapes as for SD 1.x, with SDXL's conventions: attention heads of 64 channels (UNet and
both text encoders: 320/64 = 5, 640/64 = 10, 1280/64 = 20; CLIP-L 12, bigG 20), the transformer depth of each
level counted from its `transformer_blocks.N` keys, linear proj_in/proj_out, the added embedding's time width from
label_emb's input (pooled width + 6 · width). CLIP-L runs quick_gelu, bigG gelu. OpenCLIP's `logit_scale` (a
contrastive-training temperature) and SGM's `denoiser.sigmas` buffer are ignored, as diffusers does.

Refused by name: the SDXL refiner (one OpenCLIP embedder `conditioner.embedders.0.model.*`, a 384-channel UNet,
2560-wide label_emb) and SDXL inpainting (9 UNet input channels).
"""
from __future__ import annotations

from pathlib import Path

import torch

from t2vz.sd.unet import UNetConfig

from weights_convert.checkpoint_io import ConversionError, read_weights
from weights_convert.ldm import (
    NON_WEIGHTS, UNET, VAE_LOSS, encoder_layout, indices, read_vae_config, shape_reader, unet_sources, vae_names,
    vae_tensors,
)
from weights_convert.target import SDXL_VAE_SCALING, Source, check_keys, clip_config, expected_shapes

CONDITIONER = "conditioner.embedders."
CLIP_L = CONDITIONER + "0.transformer."
OPEN_CLIP = CONDITIONER + "1.model."
REFINER_OPEN_CLIP = CONDITIONER + "0.model."
HEAD_DIM = 64  # SDXL's attention heads are 64 channels wide (UNet and text encoders)
TIME_IDS = 6  # original size (h, w), crop (top, left), target size (h, w)
BIGG_ACT = "gelu"  # OpenCLIP ViT-bigG's MLP: exact GELU (CLIP ViT-L: quick_gelu)
REFINER_WIDTH = 384
# not weights of the four networks: CLIP's index buffer, OpenCLIP's contrastive temperature and causal mask, SGM's
# noise levels (DiscreteDenoiser's buffer, saved by some SGM versions)
SDXL_NON_WEIGHTS = {CLIP_L + "text_model.embeddings.position_ids", OPEN_CLIP + "logit_scale",
                    OPEN_CLIP + "attn_mask", "denoiser.sigmas"}
OPEN_CLIP_LEAVES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias",
                 "text_projection.weight": "text_projection"}
QKV = ("q_proj", "k_proj", "v_proj")
BASE_HINT = "t2vz takes the SDXL base model (sd_xl_base_1.0.safetensors or a checkpoint fine-tuned from it)"


def is_sdxl_file(sd) -> bool:
    return any(k.startswith((CONDITIONER, UNET + "label_emb.")) for k in sd)


def refuse_sdxl_variants(sd, where: str) -> None:
    """The SDXL refiner and SDXL inpainting, refused by name (t2vz's pipelines run the base model)."""
    conv_in = sd.get(UNET + "input_blocks.0.0.weight")
    label = sd.get(UNET + "label_emb.0.0.weight")
    only_open_clip = any(k.startswith(REFINER_OPEN_CLIP) for k in sd) and not any(k.startswith(CLIP_L) for k in sd)
    if only_open_clip or (conv_in is not None and conv_in.shape[0] == REFINER_WIDTH):
        why = ("a single OpenCLIP text encoder, conditioner.embedders.0.model.*" if only_open_clip
               else f"a {REFINER_WIDTH}-channel UNet")
        width = f", {label.shape[1]}-wide label_emb" if label is not None else ""
        raise ConversionError(f"{where} is the Stable Diffusion XL refiner ({why}{width}), which refines the base "
                              f"model's latents with an aesthetic score; {BASE_HINT}")
    if conv_in is not None and conv_in.shape[1] == 9:
        raise ConversionError(f"{where} is Stable Diffusion XL inpainting (UNet with 9 input channels: latent, mask, "
                              f"masked image); t2vz's pipelines feed no mask, and {BASE_HINT}")


def heads(channels: int) -> int:
    return max(channels // HEAD_DIM, 1)


def read_unet_config(sd, where: str, need, pooled: int) -> UNetConfig:
    """The SDXL UNet's config from its shapes; `pooled`: the second text encoder's projection width."""
    conv_in, firsts, per_level = encoder_layout(sd, UNET, where, need, family="SDXL")
    widths = [need(f"{UNET}input_blocks.{i}.0.out_layers.3.weight", "UNet").shape[0] for i in firsts]
    attends = [any(k.startswith(f"{UNET}input_blocks.{i}.1.") for k in sd) for i in firsts]
    tb = "transformer_blocks."
    depth = [len(indices(sd, f"{UNET}input_blocks.{i}.1.{tb}", UNET.count(".") + 4)) if a else 1
             for i, a in zip(firsts, attends)]
    mid_depth = len(indices(sd, f"{UNET}middle_block.1.{tb}", UNET.count(".") + 3))
    if not attends[-1]:
        depth[-1] = mid_depth
    if mid_depth != depth[-1]:
        raise ConversionError(f"{where}: the mid block has {mid_depth} transformer blocks and the deepest level "
                              f"{depth[-1]}; t2vz builds SDXL's mid block with the deepest level's depth")
    proj_in = need(UNET + "middle_block.1.proj_in.weight", "UNet")
    label = need(UNET + "label_emb.0.0.weight", "UNet")
    time_width, rest = divmod(label.shape[1] - pooled, TIME_IDS)
    if rest or time_width <= 0:
        raise ConversionError(f"{where}: label_emb takes {label.shape[1]} features, not a {pooled}-wide pooled text "
                              f"embedding and {TIME_IDS} size/crop sinusoids; {BASE_HINT}")
    return UNetConfig(
        in_channels=conv_in.shape[1], out_channels=need(UNET + "out.2.weight", "UNet").shape[0],
        block_out_channels=widths, attention_levels=attends, layers_per_block=per_level - 1,
        num_attention_heads=tuple(heads(w) for w in widths), transformer_layers_per_block=tuple(depth),
        cross_attention_dim=need(UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "UNet").shape[1],
        use_linear_projection=proj_in.ndim == 2, addition_embed_type="text_time", addition_time_embed_dim=time_width,
        projection_class_embeddings_input_dim=label.shape[1],
    )


def read_clip_l_config(sd, need) -> dict:
    clip = CLIP_L + "text_model."
    tokens = need(clip + "embeddings.token_embedding.weight", "first text encoder (CLIP ViT-L)")
    return clip_config(
        vocab_size=tokens.shape[0], hidden_size=tokens.shape[1],
        intermediate_size=need(clip + "encoder.layers.0.mlp.fc1.weight", "first text encoder").shape[0],
        num_hidden_layers=len(indices(sd, clip + "encoder.layers.", clip.count(".") + 2)),
        max_position_embeddings=need(clip + "embeddings.position_embedding.weight", "first text encoder").shape[0],
    )


def read_open_clip_config(sd, need) -> dict:
    what = "second text encoder (OpenCLIP ViT-bigG)"
    tokens = need(OPEN_CLIP + "token_embedding.weight", what)
    return clip_config(
        vocab_size=tokens.shape[0], hidden_size=tokens.shape[1],
        intermediate_size=need(OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight", what).shape[0],
        num_hidden_layers=len(indices(sd, OPEN_CLIP + "transformer.resblocks.", OPEN_CLIP.count(".") + 2)),
        max_position_embeddings=need(OPEN_CLIP + "positional_embedding", what).shape[0],
        projection_dim=need(OPEN_CLIP + "text_projection", what).shape[1], hidden_act=BIGG_ACT,
    )


def open_clip_name(key: str) -> tuple[str, int | None]:
    """A canonical CLIPTextModelWithProjection key → (its OpenCLIP key, which third of in_proj it is or None)."""
    if key in OPEN_CLIP_TOP:
        return OPEN_CLIP + OPEN_CLIP_TOP[key], None
    layer, _, rest = key.removeprefix("text_model.encoder.layers.").partition(".")
    module, _, param = rest.rpartition(".")
    block = f"{OPEN_CLIP}transformer.resblocks.{layer}."
    if module.startswith("self_attn.") and module.removeprefix("self_attn.") in QKV:
        return f"{block}attn.in_proj_{param}", QKV.index(module.removeprefix("self_attn."))
    return f"{block}{OPEN_CLIP_LEAVES.get(module, module)}.{param}", None


def open_clip_tensors(sd, expected) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(canonical key → tensor found, canonical key → its OpenCLIP key): in_proj split in q, k, v; text_projection
    transposed."""
    found, names = {}, {}
    for key in expected:
        name, third = open_clip_name(key)
        names[key] = name
        if name not in sd:
            continue
        t = sd[name]
        if third is not None:
            width = t.shape[0] // 3
            t = t[third * width:(third + 1) * width]
        elif key == "text_projection.weight":
            t = t.T
        found[key] = t.contiguous()
    return found, names


def read_sdxl_file(path: str | Path, prefer_ema: bool = True, weights=None) -> Source:
    """Read and check an original SDXL base checkpoint (.safetensors, or .ckpt holding plain tensors)."""
    where = str(path)
    sd = read_weights(path) if weights is None else weights
    refuse_sdxl_variants(sd, where)
    need = shape_reader(sd, where, "it is a Stable Diffusion XL checkpoint (conditioner.embedders.* / label_emb "
                                   "keys): is it a complete SDXL base checkpoint (UNet, VAE and both text encoders)?")
    text_2 = read_open_clip_config(sd, need)
    configs = {"unet": read_unet_config(sd, where, need, text_2["projection_dim"]),
               "vae": read_vae_config(sd, need, scaling_factor=SDXL_VAE_SCALING),
               "text_encoder": read_clip_l_config(sd, need), "text_encoder_2": text_2}
    expected = {name: expected_shapes(name, cfg) for name, cfg in configs.items()}

    unet_names, superseded, use_ema, notes = unet_sources(sd, expected["unet"], configs["unet"], prefer_ema)
    names = {"unet": unet_names, "vae": vae_names(expected["vae"], configs["vae"]),
             "text_encoder": {k: CLIP_L + k for k in expected["text_encoder"]}}
    found = {c: {k: sd[n] for k, n in names[c].items() if n in sd} for c in ("unet", "text_encoder")}
    found["vae"] = vae_tensors(sd, names["vae"])
    found["text_encoder_2"], names["text_encoder_2"] = open_clip_tensors(sd, expected["text_encoder_2"])

    vae_loss = {k for k in sd if k.startswith(VAE_LOSS)}
    ignored = NON_WEIGHTS | SDXL_NON_WEIGHTS | superseded | vae_loss
    used = {n for c in names.values() for n in c.values()}
    unexpected = [k for k in sd if k not in used and k not in ignored]
    check_keys(where, {c: (found[c], expected[c], names[c]) for c in names}, unexpected,
               ". Is the file a complete SDXL base checkpoint rather than a LoRA, VAE or merge fragment?",
               "an SDXL base model")
    if vae_loss:
        notes.append(f"left out {len(vae_loss)} {VAE_LOSS}* tensors (the VAE's training losses, unused at inference)")
    notes.append(f"SDXL base: VAE scaling factor {SDXL_VAE_SCALING} (SDXL's own, not stored in the file)")
    return Source("single-file", configs, found, "sdxl", ema=use_ema, notes=notes)

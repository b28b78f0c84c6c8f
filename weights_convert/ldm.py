"""Original single-file SD 1.x checkpoints (CompVis latent-diffusion layout) → t2vz names. SDXL single files
(Stability's SGM layout, the same UNet and VAE naming) are recognised here and read by `sdxl.py`.

The file holds three networks under three prefixes: `model.diffusion_model.` (UNet, openaimodel.py),
`first_stage_model.` (VAE, taming's Encoder/Decoder) and `cond_stage_model.transformer.` (transformers' CLIP text
model, with or without its `text_model.` level). Every t2vz key is mapped to its LDM key by the index rules and the
one rename table below; the configs are read off the tensor shapes.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from t2vz.sd.model_folder import is_lora_key
from t2vz.sd.unet import UNetConfig
from t2vz.sd.vae import VAEConfig

from weights_convert.checkpoint_io import ConversionError, name_list, read_weights
from weights_convert.target import (
    SD2_CONTEXT_DIM, Source, check_keys, clip_config, expected_shapes, refuse_sd2, variant,
)

UNET, VAE, CLIP, EMA = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", "model_ema."
# LDM's noise-schedule buffers and EMA bookkeeping: saved in the file, not weights of the three networks.
NON_WEIGHTS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates",
    CLIP + "text_model.embeddings.position_ids", CLIP + "embeddings.position_ids",  # CLIP's 0..76 index buffer
}

# The autoencoder's training losses (LPIPS, discriminator) that some files carry: not part of the model.
VAE_LOSS = "first_stage_model.loss."

# t2vz (= diffusers) module name → LDM module name, applied inside the blocks that the index rules locate.
RENAMES = {
    "unet": {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             # SDXL's added (pooled text, size and crop) embedding
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"},
    "unet_resnet": {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"},
    "vae": {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"},
    "vae_resnet": {"conv_shortcut": "nin_shortcut"},
    "vae_attention": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"},
}


def unet_rules(cfg: UNetConfig) -> list:
    """Block index arithmetic. LDM numbers the UNet's blocks flat: input_blocks.0 is conv_in, then per level
    `layers_per_block` (resnet, attention) pairs and a downsampler; output_blocks run from the lowest resolution
    with one more resnet per level, the upsampler after the attention if the level has one."""
    n = cfg.layers_per_block + 1  # LDM blocks per level
    top = len(cfg.block_out_channels) - 1
    return [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"input_blocks.{1 + i * n + j}.0.", "unet_resnet"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda i, j: f"input_blocks.{1 + i * n + j}.1.", None),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda i: f"input_blocks.{(i + 1) * n}.0.op.", None),
        (r"mid_block\.resnets\.(\d+)\.", lambda j: f"middle_block.{2 * j}.", "unet_resnet"),
        (r"mid_block\.attentions\.0\.", lambda: "middle_block.1.", None),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"output_blocks.{i * n + j}.0.", "unet_resnet"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda i, j: f"output_blocks.{i * n + j}.1.", None),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda i: f"output_blocks.{i * n + n - 1}.{2 if cfg.attention_levels[top - i] else 1}.", None),
        (r"", lambda: "", "unet"),
    ]


def vae_rules(cfg: VAEConfig) -> list:
    """The VAE's levels keep their index in the encoder (`down.i`) but are reversed in the decoder (`up.i`)."""
    top = len(cfg.block_out_channels) - 1
    return [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"encoder.down.{i}.block.{j}.", "vae_resnet"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda i: f"encoder.down.{i}.downsample.", None),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"decoder.up.{top - i}.block.{j}.", "vae_resnet"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda i: f"decoder.up.{top - i}.upsample.", None),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda part, j: f"{part}.mid.block_{j + 1}.", "vae_resnet"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.", lambda part: f"{part}.mid.attn_1.", "vae_attention"),
        (r"", lambda: "", "vae"),
    ]


def ldm_name(key: str, rules: list) -> str:
    """One t2vz key → its LDM key: the first matching index rule rewrites the block, RENAMES the module in it."""
    for pattern, block, table in rules:
        m = re.match(pattern, key)
        if m:
            module, _, param = key[m.end():].rpartition(".")
            module = RENAMES[table].get(module, module) if table else module
            return block(*(int(g) if g.isdigit() else g for g in m.groups())) + (module and module + ".") + param
    raise AssertionError(f"no rule for {key}")  # unreachable: the last rule matches everything


def ema_name(unet_key: str) -> str:
    """LDM's EMA copy of a UNet weight: `model_ema.diffusion_model` + the rest of the key without its dots."""
    return EMA + "diffusion_model" + unet_key[len(UNET):].replace(".", "")


def refuse_other_models(sd: dict, where: str) -> None:
    """Refuse, by their keys, the checkpoints that are not SD 1.x models (SDXL files never get here:
    `read_single_file` hands them to `sdxl.read_sdxl_file`)."""
    keys = list(sd)
    if any(k.startswith("control_model.") for k in keys):
        raise ConversionError(f"{where} is a ControlNet checkpoint (control_model.* keys), not an SD 1.x model; "
                              "python -m weights_convert (convert()) writes it as a ControlNet folder for "
                              "t2vz.load_controlnet")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise refuse_sd2(where, "OpenCLIP text encoder, cond_stage_model.model.* keys")
    lora = [k for k in keys if is_lora_key(k)]
    if lora and not any(k.startswith(UNET) for k in keys):
        raise ConversionError(f"{where} is a LoRA (keys like {lora[0]}), not a full SD 1.x checkpoint: it adds to "
                              "a base model and is not one; convert the base model's checkpoint")
    if not any(k.startswith(UNET) for k in keys):
        hint = (" It looks like one component of a diffusers folder: pass the whole folder"
                if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys) else "")
        raise ConversionError(f"{where} has no UNet weights (model.diffusion_model.*), so it is not a full SD 1.x "
                              f"checkpoint (a LoRA, VAE or embedding?). Its keys begin: {name_list(keys, 4)}.{hint}")


def shape_reader(sd, where: str, hint: str):
    """need(key, what): sd[key], or a ConversionError naming the key, what it gives the shape of, and `hint`."""

    def need(key: str, what: str) -> torch.Tensor:
        if key not in sd:
            raise ConversionError(f"{where} has no {key}, which gives the {what}'s shape; {hint}")
        return sd[key]

    return need


def indices(sd, prefix: str, part: int) -> set[int]:
    """The integers at dot-separated position `part` of the keys that start with `prefix`."""
    return {int(p[part]) for p in (k.split(".") for k in sd if k.startswith(prefix)) if p[part].isdigit()}


def encoder_layout(sd, prefix: str, where: str, need, what: str = "UNet", family: str = "SD 1.x"
                   ) -> tuple[torch.Tensor, list[int], int]:
    """(conv_in's weight, the first input block of each level, LDM blocks per level = layers_per_block + 1) of the
    UNet (or ControlNet encoder) under `prefix`: levels = downsamplers + 1, levels · per_level input blocks."""
    conv_in = need(prefix + "input_blocks.0.0.weight", what)
    blocks = indices(sd, prefix + "input_blocks.", prefix.count(".") + 1)
    levels = 1 + sum(f"{prefix}input_blocks.{i}.0.op.weight" in sd for i in blocks)
    per_level, rest = divmod(len(blocks), levels)
    if rest or per_level < 2 or blocks != set(range(len(blocks))):
        raise ConversionError(f"{where}: cannot read the {what}'s layout from its {len(blocks)} input_blocks and "
                              f"{levels - 1} downsamplers; it is not an {family} {what}")
    return conv_in, [1 + level * per_level for level in range(levels)], per_level


def read_encoder_config(sd, prefix: str, where: str, need, what: str = "UNet") -> dict:
    """The UNetConfig fields of the encoder under `prefix` (`input_blocks`, `middle_block`; SD 1.x's 8 heads) from
    the tensor shapes; shared by the UNet and the ControlNet, whose encoder is a copy of the UNet's. Refuses SD 2.x."""
    conv_in, firsts, per_level = encoder_layout(sd, prefix, where, need, what)
    proj_in = need(prefix + "middle_block.1.proj_in.weight", what)
    model = "ControlNet" if what == "ControlNet" else "model"
    if proj_in.ndim == 2:
        raise refuse_sd2(where, "linear proj_in in the transformer blocks (use_linear_projection)", model)
    context = need(prefix + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", what).shape[1]
    if context == SD2_CONTEXT_DIM:
        raise refuse_sd2(where, f"{context}-dim cross-attention context", model)
    return dict(
        in_channels=conv_in.shape[1],
        block_out_channels=[need(f"{prefix}input_blocks.{i}.0.out_layers.3.weight", what).shape[0] for i in firsts],
        # a level attends if its first input block has a second module (the transformer) at all, so that one
        # missing tensor of it is reported as missing, not the whole transformer as unexpected
        attention_levels=[any(k.startswith(f"{prefix}input_blocks.{i}.1.") for k in sd) for i in firsts],
        layers_per_block=per_level - 1,
        cross_attention_dim=context,
    )


def read_configs(sd: dict, where: str) -> tuple[UNetConfig, VAEConfig, dict, str]:
    """UNet, VAE and text-encoder configs from the tensor shapes, and the prefix of the text encoder's keys."""
    need = shape_reader(sd, where, "is it a complete SD 1.x checkpoint (UNet, VAE and text encoder)?")
    encoder = read_encoder_config(sd, UNET, where, need)
    unet = UNetConfig(**encoder, out_channels=need(UNET + "out.2.weight", "UNet").shape[0])
    vae = read_vae_config(sd, need)

    clip = CLIP + "text_model." if any(k.startswith(CLIP + "text_model.") for k in sd) else CLIP
    tokens = need(clip + "embeddings.token_embedding.weight", "text encoder")
    if tokens.shape[1] == SD2_CONTEXT_DIM:
        raise refuse_sd2(where, f"{tokens.shape[1]}-wide text encoder")
    text = clip_config(
        vocab_size=tokens.shape[0],
        hidden_size=tokens.shape[1],
        intermediate_size=need(clip + "encoder.layers.0.mlp.fc1.weight", "text encoder").shape[0],
        num_hidden_layers=len(indices(sd, clip + "encoder.layers.", clip.count(".") + 2)),
        max_position_embeddings=need(clip + "embeddings.position_embedding.weight", "text encoder").shape[0],
    )
    return unet, vae, text, clip


def read_vae_config(sd, need, **fixed) -> VAEConfig:
    """The VAE's config from the shapes of its `first_stage_model.*` tensors; `fixed`: fields the file cannot tell
    (SDXL's scaling_factor)."""
    enc = VAE + "encoder."
    need(enc + "conv_in.weight", "VAE")
    vae_levels = len(indices(sd, enc + "down.", 3))
    return VAEConfig(
        in_channels=sd[enc + "conv_in.weight"].shape[1],
        out_channels=need(VAE + "decoder.conv_out.weight", "VAE").shape[0],
        latent_channels=need(VAE + "post_quant_conv.weight", "VAE").shape[0],
        block_out_channels=[need(f"{enc}down.{i}.block.0.conv2.weight", "VAE").shape[0] for i in range(vae_levels)],
        layers_per_block=len(indices(sd, enc + "down.0.block.", 5)),
        **fixed,
    )


def vae_names(keys, cfg: VAEConfig) -> dict[str, str]:
    """t2vz VAE key → its `first_stage_model.*` key."""
    return {k: VAE + ldm_name(k, vae_rules(cfg)) for k in keys}


def vae_tensors(sd, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The VAE's tensors found in the file, its mid-block attention's 1×1 convs as linears."""
    attention = ".mid_block.attentions.0.to_"
    return {k: conv1x1_to_linear(sd[n]) if attention in k else sd[n] for k, n in names.items() if n in sd}


def unet_sources(sd, keys, cfg: UNetConfig, prefer_ema: bool) -> tuple[dict[str, str], set[str], bool, list[str]]:
    """t2vz UNet key → its key in the file (the EMA copy when the file has one and `prefer_ema`), the file's keys
    left out on purpose (the copy not taken), whether EMA was taken, and notes saying so."""
    has_ema = any(k.startswith(EMA + "diffusion_model") for k in sd)
    use_ema = has_ema and prefer_ema
    live = {k: UNET + ldm_name(k, unet_rules(cfg)) for k in keys}
    if use_ema:
        return ({k: ema_name(n) for k, n in live.items()}, set(live.values()), True,
                ["UNet: EMA weights (model_ema.*), the ones meant for inference; --no-ema takes the live ones"])
    if has_ema:
        return (live, {k for k in sd if k.startswith(EMA)}, False,
                ["UNet: live weights (--no-ema); the file's EMA weights were left out"])
    return live, set(), False, []


def conv1x1_to_linear(t: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention projects q, k, v and the output with 1×1 convs (c, c, 1, 1); t2vz with linears (c, c)."""
    return t[:, :, 0, 0] if t.ndim == 4 and t.shape[2:] == (1, 1) else t


def read_single_file(path: str | Path, prefer_ema: bool = True, allow_inpainting: bool = False,
                     weights=None) -> Source:
    """Read and check an original SD 1.x checkpoint (.safetensors, or .ckpt/.pt/.pth holding plain tensors);
    `weights`: the file's tensors when already read (`read_weights(path)`)."""
    where = str(path)
    sd = read_weights(path) if weights is None else weights
    if any(k.startswith(("conditioner.embedders.", UNET + "label_emb.")) for k in sd):
        from weights_convert.sdxl import read_sdxl_file  # sdxl.py builds on this module

        return read_sdxl_file(path, prefer_ema=prefer_ema, weights=sd)
    refuse_other_models(sd, where)
    unet_cfg, vae_cfg, text_cfg, clip = read_configs(sd, where)
    kind = variant(unet_cfg.in_channels, allow_inpainting, where)
    configs = {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": text_cfg}
    expected = {name: expected_shapes(name, cfg) for name, cfg in configs.items()}

    unet_names, superseded, use_ema, notes = unet_sources(sd, expected["unet"], unet_cfg, prefer_ema)
    names = {
        "unet": unet_names,
        "vae": vae_names(expected["vae"], vae_cfg),
        "text_encoder": {k: clip + k.removeprefix("text_model.") for k in expected["text_encoder"]},
    }
    found = {c: {k: sd[n] for k, n in names[c].items() if n in sd} for c in names}
    found["vae"] = vae_tensors(sd, names["vae"])

    ignored = set(NON_WEIGHTS) | superseded
    vae_loss = {k for k in sd if k.startswith(VAE_LOSS)}
    ignored |= vae_loss
    used = {n for c in names.values() for n in c.values()}
    unexpected = [k for k in sd if k not in used and k not in ignored]
    partial_ema = use_ema and any(n not in sd for n in names["unet"].values())
    hint = ". The file's EMA weights (model_ema.*) are incomplete: pass --no-ema to take the live ones"
    check_keys(where, {c: (found[c], expected[c], names[c]) for c in names}, unexpected, hint if partial_ema else "")

    if clip == CLIP:
        notes.append("text encoder keys without the text_model. level (older file)")
    if vae_loss:
        notes.append(f"left out {len(vae_loss)} {VAE_LOSS}* tensors (the VAE's training losses, unused at inference)")
    return Source("single-file", configs, found, kind, ema=use_ema, notes=notes)

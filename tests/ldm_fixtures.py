"""Random SD 1.x checkpoints in the layouts people have: original single files (CompVis LDM keys) and diffusers
folders. Test-only.

The LDM names are produced here by walking the network the way openaimodel.py builds it (a running block counter),
independently of weights_convert's index arithmetic; diffusers' own converter then checks both directions.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from reference_models import TINY_UNET as _TINY_UNET
from reference_models import TINY_VAE, clip_text_model, diffusers_unet, diffusers_vae
from safetensors.torch import save_file

from t2vz.sd.text_encoder import build_clip_text_model, canonical_clip_state_dict, shipped_tokenizer_dir
from t2vz.sd.unet import UNetConfig
from t2vz.sd.vae import VAEConfig

# CLIP hidden 64 → weights_convert derives 64 // 64 = 1 head, as it derives 12 for ViT-L/14's 768.
# A single file implies CLIP heads = hidden // 64, so the tiny text encoder is 64 wide, and the UNet's
# cross-attention takes that width.
TINY_UNET = dataclasses.replace(_TINY_UNET, cross_attention_dim=64)
TINY_CLIP = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64)
LDM_BUFFERS = {"betas": (1000,), "alphas_cumprod": (1000,), "alphas_cumprod_prev": (1000,),
               "sqrt_alphas_cumprod": (1000,), "posterior_mean_coef1": (1000,), "logvar": (1000,)}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_blocks(cfg: UNetConfig) -> dict[str, tuple[str, bool]]:
    """diffusers module → (LDM module, is a resnet), counting blocks as LDM's UNetModel.__init__ appends them."""
    levels, n = len(cfg.block_out_channels), cfg.layers_per_block
    m = {"conv_in": ("input_blocks.0.0", False), "time_embedding.linear_1": ("time_embed.0", False),
         "time_embedding.linear_2": ("time_embed.2", False), "conv_norm_out": ("out.0", False),
         "conv_out": ("out.2", False), "mid_block.resnets.0": ("middle_block.0", True),
         "mid_block.attentions.0": ("middle_block.1", False), "mid_block.resnets.1": ("middle_block.2", True)}
    block = 1
    for level in range(levels):
        for j in range(n):
            m[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{block}.0", True)
            m[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{block}.1", False)
            block += 1
        if level != levels - 1:
            m[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{block}.0.op", False)
            block += 1
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            m[f"up_blocks.{up}.resnets.{j}"] = (f"output_blocks.{block}.0", True)
            m[f"up_blocks.{up}.attentions.{j}"] = (f"output_blocks.{block}.1", False)
            if j == n and level != 0:
                layer = 2 if cfg.attention_levels[level] else 1
                m[f"up_blocks.{up}.upsamplers.0.conv"] = (f"output_blocks.{block}.{layer}.conv", False)
            block += 1
    return m


def vae_blocks(cfg: VAEConfig) -> dict[str, tuple[str, str | None]]:
    """diffusers module → (LDM module, which leaf renames apply)."""
    levels = len(cfg.block_out_channels)
    m = {"encoder.conv_norm_out": ("encoder.norm_out", None), "decoder.conv_norm_out": ("decoder.norm_out", None)}
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", "attention")
        for j in range(2):
            m[f"{part}.mid_block.resnets.{j}"] = (f"{part}.mid.block_{j + 1}", "resnet")
    for i in range(levels):
        for j in range(cfg.layers_per_block + 1):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", "resnet")
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{levels - 1 - i}.block.{j}", "resnet")
        m[f"encoder.down_blocks.{i}.downsamplers.0"] = (f"encoder.down.{i}.downsample", None)
        m[f"decoder.up_blocks.{i}.upsamplers.0"] = (f"decoder.up.{levels - 1 - i}.upsample", None)
    return m


def _rename(key: str, blocks: dict) -> tuple[str, str, object]:
    """Longest diffusers module prefix of `key` → (LDM prefix, rest of the key, tag)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in blocks:
            return blocks[prefix][0], ".".join(parts[cut:]), blocks[prefix][1]
    return "", key, None


def to_ldm(unet: dict, vae: dict, clip: dict, unet_cfg: UNetConfig, vae_cfg: VAEConfig, *,
           text_model_level: bool = True, ema_unet: dict | None = None, buffers: bool = True) -> dict:
    """diffusers-named state dicts → one LDM single-file state dict (clip with canonical text_model.* keys)."""
    out = {}
    ublocks, vblocks = unet_blocks(unet_cfg), vae_blocks(vae_cfg)
    for key, t in unet.items():
        prefix, rest, is_resnet = _rename(key, ublocks)
        if is_resnet:
            module, _, param = rest.rpartition(".")
            rest = f"{UNET_RESNET[module]}.{param}"
        ldm = "model.diffusion_model." + (f"{prefix}.{rest}" if prefix else rest)
        out[ldm] = t
        if ema_unet is not None:
            out["model_ema.diffusion_model" + ldm[len("model.diffusion_model."):].replace(".", "")] = ema_unet[key]
    for key, t in vae.items():
        prefix, rest, tag = _rename(key, vblocks)
        module, _, param = rest.rpartition(".")
        if tag == "resnet" and module == "conv_shortcut":
            rest = f"nin_shortcut.{param}"
        if tag == "attention":
            rest = f"{VAE_ATTENTION[module]}.{param}"
            t = t[:, :, None, None] if t.ndim == 2 else t  # LDM's 1×1 convs
        out["first_stage_model." + (f"{prefix}.{rest}" if prefix else rest)] = t
    clip_prefix = "cond_stage_model.transformer." + ("text_model." if text_model_level else "")
    for key, t in clip.items():
        out[clip_prefix + key.removeprefix("text_model.")] = t
    if buffers:  # what a real LDM file carries besides the weights
        gen = torch.Generator().manual_seed(123)
        out.update({k: torch.rand(shape, generator=gen) for k, shape in LDM_BUFFERS.items()})
        out[clip_prefix + "embeddings.position_ids"] = torch.arange(77)[None]
        if ema_unet is not None:
            out["model_ema.decay"] = torch.tensor(0.9999)
            out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return out


def tiny_models(seed: int = 0, unet_cfg: UNetConfig = TINY_UNET):
    """Perturbed random diffusers UNet, VAE and transformers CLIP text model with the tiny configs; the same for
    the same seed, whatever the global RNG's state."""
    torch.manual_seed(seed)
    return (diffusers_unet(unet_cfg, seed), diffusers_vae(TINY_VAE, seed + 1),
            clip_text_model(TINY_CLIP, seed + 2))


def tiny_state_dicts(seed: int = 0, unet_cfg: UNetConfig = TINY_UNET, dtype=torch.float32):
    unet, vae, clip = tiny_models(seed, unet_cfg)
    sds = unet.state_dict(), vae.state_dict(), canonical_clip_state_dict(clip.state_dict())
    return tuple({k: v.to(dtype) for k, v in sd.items()} for sd in sds)


def tiny_ldm_checkpoint(*, ema: bool = False, text_model_level: bool = True, dtype=torch.float32,
                        unet_cfg: UNetConfig = TINY_UNET) -> dict:
    """A random tiny single-file checkpoint; with `ema`, the EMA UNet weights differ from the live ones."""
    unet, vae, clip = tiny_state_dicts(0, unet_cfg, dtype)
    ema_unet = tiny_state_dicts(10, unet_cfg, dtype)[0] if ema else None
    return to_ldm(unet, vae, clip, unet_cfg, TINY_VAE, text_model_level=text_model_level, ema_unet=ema_unet)


def write_checkpoint(sd: dict, path: Path) -> Path:
    """`.safetensors`, or a Lightning-style `.ckpt` ({"state_dict": ..., "global_step": ...})."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6}, path)
    return path


def write_diffusers_folder(path: Path, unet, vae, clip, *, variant: str | None = None, safetensors: bool = True,
                           old_vae_names: bool = False, clip_text_model_level: bool = False,
                           tokenizer_config: bool = True, prediction_type: str = "epsilon") -> Path:
    """A diffusers SD folder as `save_pretrained` writes it, with a tokenizer and a scheduler config."""
    path = Path(path)
    unet.save_pretrained(path / "unet", variant=variant, safe_serialization=safetensors)
    vae.save_pretrained(path / "vae", variant=variant, safe_serialization=safetensors)
    clip.save_pretrained(path / "text_encoder")  # transformers ≥ 5 writes keys without the text_model. level
    if old_vae_names or clip_text_model_level:
        from safetensors.torch import load_file
        if old_vae_names:
            file = next((path / "vae").glob("diffusion_pytorch_model*"))
            sd = load_file(file) if file.suffix == ".safetensors" else torch.load(file, weights_only=True)
            old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
            renamed = {}
            for k, v in sd.items():
                for new, was in old.items():
                    k = k.replace(new, was) if ".attentions." in k else k
                renamed[k] = v
            if file.suffix == ".safetensors":
                save_file(renamed, str(file))
            else:
                torch.save(renamed, file)
        if clip_text_model_level:  # as the SD 1.5 repository's text_encoder/model.safetensors (older transformers)
            file = path / "text_encoder" / "model.safetensors"
            sd = canonical_clip_state_dict(load_file(file))
            sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
            save_file(sd, str(file))
    (path / "tokenizer").mkdir()
    names = ["vocab.json", "merges.txt"] + (["tokenizer_config.json"] if tokenizer_config else [])
    for name in names:
        shutil.copyfile(shipped_tokenizer_dir() / name, path / "tokenizer" / name)
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "num_train_timesteps": 1000, "prediction_type": prediction_type, "steps_offset": 1}))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return path


def sd15_shapes() -> dict[str, dict[str, torch.Size]]:
    """diffusers-named shapes of the full SD 1.5 UNet, VAE and CLIP ViT-L/14 text model (meta device, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from reference_models import SD15_CLIP

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
        clip = build_clip_text_model(SD15_CLIP)
    return {"unet": {k: v.shape for k, v in unet.state_dict().items()},
            "vae": {k: v.shape for k, v in vae.state_dict().items()},
            "text_encoder": canonical_clip_state_dict({k: v.shape for k, v in clip.state_dict().items()}),
            "configs": (unet.config, vae.config)}


def random_like(shapes: dict[str, torch.Size], pool: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Distinct random tensors cheaply: each a copy of a slice of `pool` at its own random offset."""
    out = {}
    for key, shape in shapes.items():
        numel = shape.numel()
        start = int(torch.randint(0, pool.numel() - numel + 1, (), generator=gen))
        out[key] = pool[start:start + numel].view(shape).clone()
    return out

"""Reference (diffusers / transformers) models with random, perturbed weights, tiny or of the full SD 1.5 shapes,
and the matching t2vz configs: the oracle of the parity tests (tests/, which find this folder on pytest's
`pythonpath`) and of the benchmark (experiments/benchmark.py). diffusers comes with the test extra; t2vz itself
never imports it."""
from __future__ import annotations

import torch

from t2vz.sd.controlnet import ControlNetConfig
from t2vz.sd.unet import UNetConfig
from t2vz.sd.vae import VAEConfig


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter away from its default init (norm weights off 1, biases off 0, zero-inits off 0).

    A mapping bug between two norms left at weight 1, bias 0 is invisible; after this, no two parameters agree.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if p.ndim == 1 and ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)  # norm gains around 1
        else:
            p.add_(scale * noise)
    return module


TINY_UNET = UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), cross_attention_dim=32)
SD15_UNET = UNetConfig()
TINY_CONTROLNET = ControlNetConfig.from_unet(TINY_UNET, conditioning_embedding_out_channels=(8, 16, 16, 32))
TINY_VAE = VAEConfig(block_out_channels=(32, 64))
SD15_VAE = VAEConfig()
TINY_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, projection_dim=32)
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, projection_dim=768)


def diffusers_unet(cfg: UNetConfig, seed: int = 0):
    """diffusers' UNet2DConditionModel of `cfg`'s shape, perturbed (`diffusers_sdxl_unet` builds SD 1.5 and SDXL)."""
    return diffusers_sdxl_unet(cfg, seed)


def diffusers_controlnet(cfg: ControlNetConfig, seed: int = 0):
    """diffusers' ControlNetModel of `cfg`'s shape; perturb_ moves its zero convolutions off zero."""
    from diffusers import ControlNetModel

    model = ControlNetModel(
        in_channels=cfg.in_channels, conditioning_channels=cfg.conditioning_channels,
        block_out_channels=cfg.block_out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        layers_per_block=cfg.layers_per_block, attention_head_dim=cfg.num_attention_heads,
        cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
        conditioning_embedding_out_channels=cfg.conditioning_embedding_out_channels,
    )
    return perturb_(model, seed).eval()


def diffusers_vae(cfg: VAEConfig, seed: int = 0):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    model = AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor,
    )
    return perturb_(model, seed).eval()


def clip_text_model(cfg: dict, seed: int = 0):
    from t2vz.sd.text_encoder import build_clip_text_model

    return perturb_(build_clip_text_model(cfg), seed, scale=0.02).eval()


def write_t2vz_folder(path, unet_cfg: UNetConfig, vae_cfg: VAEConfig, clip_cfg: dict, ref_unet, ref_vae, ref_clip):
    """A t2vz model folder holding the reference models' weights (diffusers key names are t2vz's)."""
    import dataclasses

    from t2vz.sd.model_folder import write_model_folder
    from t2vz.sd.text_encoder import canonical_clip_state_dict, shipped_tokenizer_dir

    return write_model_folder(
        path,
        {"unet": ref_unet.state_dict(), "vae": ref_vae.state_dict(),
         "text_encoder": canonical_clip_state_dict(ref_clip.state_dict())},
        {"unet": dataclasses.asdict(unet_cfg), "vae": dataclasses.asdict(vae_cfg), "text_encoder": clip_cfg},
        shipped_tokenizer_dir(),
    )


def sd15_ddim_scheduler():
    """diffusers' DDIMScheduler with SD 1.5's scheduler_config.json settings."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def reference_pipeline(cls_name: str, ref_unet, ref_vae, ref_clip):
    """A diffusers pipeline (`StableDiffusionPipeline`, `TextToVideoZeroPipeline`) on the reference models, with
    SD 1.5's DDIM scheduler and the shipped tokenizer, no safety checker."""
    import diffusers

    from t2vz.sd.text_encoder import load_tokenizer

    pipe = getattr(diffusers, cls_name)(vae=ref_vae, text_encoder=ref_clip, tokenizer=load_tokenizer(),
                                        unet=ref_unet, scheduler=sd15_ddim_scheduler(), safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stable_diffusion_pipeline(ref_unet, ref_vae, ref_clip):
    return reference_pipeline("StableDiffusionPipeline", ref_unet, ref_vae, ref_clip)


def text_to_video_zero_pipeline(ref_unet, ref_vae, ref_clip):
    """diffusers' (deprecated) TextToVideoZeroPipeline with the DDIM scheduler."""
    return reference_pipeline("TextToVideoZeroPipeline", ref_unet, ref_vae, ref_clip)


def tiny_reference_folder(path):
    """Tiny perturbed reference models and a t2vz model folder holding their weights: (folder, (unet, vae, clip))."""
    refs = diffusers_unet(TINY_UNET), diffusers_vae(TINY_VAE), clip_text_model(TINY_CLIP)
    return write_t2vz_folder(path, TINY_UNET, TINY_VAE, TINY_CLIP, *refs), refs


def tiny_instruct_pix2pix_folder(path):
    """Tiny perturbed InstructPix2Pix reference models (8-channel UNet) and a t2vz model folder holding their
    weights: (folder, (unet, vae, clip))."""
    import dataclasses

    unet_cfg = dataclasses.replace(TINY_UNET, in_channels=8)
    refs = diffusers_unet(unet_cfg), diffusers_vae(TINY_VAE), clip_text_model(TINY_CLIP)
    return write_t2vz_folder(path, unet_cfg, TINY_VAE, TINY_CLIP, *refs), refs


def instruct_pix2pix_pipeline(ref_unet, ref_vae, ref_clip):
    """diffusers' StableDiffusionInstructPix2PixPipeline with the DDIM scheduler and Text2Video-Zero's cross-frame
    attention over its three guidance branches (CrossFrameAttnProcessor(batch_size=3), as in diffusers' docs)."""
    from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
        CrossFrameAttnProcessor,
    )

    pipe = reference_pipeline("StableDiffusionInstructPix2PixPipeline", ref_unet, ref_vae, ref_clip)
    pipe.unet.set_attn_processor(CrossFrameAttnProcessor(batch_size=3))
    return pipe


# ---- Stable Diffusion XL -----------------------------------------------------------------------------------------

TINY_SDXL_POOLED_DIM = 32  # the width of TINY_SDXL_UNET's added_cond["text_embeds"] (SDXL: 1280)
TINY_SDXL_UNET = UNetConfig(
    block_out_channels=(32, 64, 64), attention_levels=(False, True, True), num_attention_heads=(1, 2, 4),
    transformer_layers_per_block=(1, 2, 3), cross_attention_dim=32, norm_num_groups=16, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TINY_SDXL_POOLED_DIM + 6 * 8,
)
SDXL_UNET = UNetConfig(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    block_out_channels=(320, 640, 1280), attention_levels=(False, True, True), num_attention_heads=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def diffusers_sdxl_unet(cfg: UNetConfig, seed: int = 0, scale: float = 0.05):
    """diffusers' UNet2DConditionModel of `cfg`'s shape with every SDXL field passed (per-level heads and depth,
    linear projections, the text_time added embedding); for an SD 1.5 config it is `diffusers_unet`'s model.
    `scale`: perturb_'s, of the weight noise."""
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    model = UNet2DConditionModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=cfg.block_out_channels,
        down_block_types=down, up_block_types=up, layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.num_attention_heads, transformer_layers_per_block=cfg.transformer_layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
        use_linear_projection=cfg.use_linear_projection, addition_embed_type=cfg.addition_embed_type,
        addition_time_embed_dim=cfg.addition_time_embed_dim if cfg.addition_embed_type else None,
        projection_class_embeddings_input_dim=(
            cfg.projection_class_embeddings_input_dim if cfg.addition_embed_type else None),
    )
    return perturb_(model, seed, scale).eval()


def sdxl_added_cond(rows: int, pooled_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random SDXL `added_cond` for `rows` rows: a pooled text embedding and plausible size/crop ids (original
    h, w; crop top, left; target h, w in pixels), distinct per row."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(256, 2048, (rows, 2), generator=gen).float()
    crops = torch.randint(0, 256, (rows, 2), generator=gen).float()
    targets = torch.randint(256, 2048, (rows, 2), generator=gen).float()
    return {"text_embeds": torch.randn(rows, pooled_dim, generator=gen),
            "time_ids": torch.cat([sizes, crops, targets], dim=1)}

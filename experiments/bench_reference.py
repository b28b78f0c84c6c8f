"""The diffusers side of experiments/benchmark.py: one random SD 1.5-shaped model written as a diffusers folder,
and diffusers' `TextToVideoZeroPipeline` loaded from it and run. t2vz itself never imports diffusers; only this
file (and the benchmark's diffusers worker process) does.

`build_diffusers_folder` initialises diffusers' `UNet2DConditionModel` and `AutoencoderKL` and transformers'
`CLIPTextModel` with their default init under a seed, then moves every parameter off its default (norm gains
around 1, biases off 0, like the parity tests' `perturb_`) so that nothing in the comparison is trivially equal,
and saves them with SD 1.5's `DDIMScheduler` and the CLIP tokenizer files that ship with t2vz as a diffusers
folder (`model_index.json`, `unet/ vae/ text_encoder/ tokenizer/ scheduler/`). The shapes (`MODEL_SHAPES`) are
the parity tests' (tests/reference_models.py): `tiny` (TINY_UNET, TINY_VAE, TINY_CLIP) and `sd15` (the full
SD 1.5 UNet, VAE and CLIP ViT-L/14 text transformer). t2vz reads the same weights after
`weights_convert.convert.convert(diffusers_folder, t2vz_folder)`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from t2vz.model_folder import TOKENIZER_FILES
from t2vz.text_encoder import build_clip_text_model, shipped_tokenizer_dir
from t2vz.unet import UNetConfig
from t2vz.vae import VAEConfig

CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# (UNet, VAE, CLIP text model) shapes; equal to tests/reference_models.py's TINY_* and SD15_* configs
MODEL_SHAPES = {
    "tiny": (
        UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), cross_attention_dim=32),
        VAEConfig(block_out_channels=(32, 64)),  # two levels: a 2x downsampling (64x64 frames, 32x32 latents)
        dict(CLIP_COMMON, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             projection_dim=32),
    ),
    "sd15": (
        UNetConfig(),
        VAEConfig(),
        dict(CLIP_COMMON, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             projection_dim=768),
    ),
}
# SD 1.5's scheduler/scheduler_config.json (stable-diffusion-v1-5), the settings both pipelines use
SD15_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
PIPELINE_CLASS = "TextToVideoZeroPipeline"


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its default init: norm gains to 1 + 0.2·N(0, 1), everything else + scale·N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if p.ndim == 1 and ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.add_(scale * noise)
    return module


def diffusers_models(size: str, seed: int):
    """Random (perturbed) diffusers UNet, VAE and transformers CLIP text model of `size` ("tiny" or "sd15")."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if size not in MODEL_SHAPES:
        raise ValueError(f"model={size!r} is not one of {sorted(MODEL_SHAPES)}")
    unet_cfg, vae_cfg, clip_cfg = MODEL_SHAPES[size]
    torch.manual_seed(seed)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in unet_cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(unet_cfg.attention_levels))
    unet = UNet2DConditionModel(
        in_channels=unet_cfg.in_channels, out_channels=unet_cfg.out_channels,
        block_out_channels=unet_cfg.block_out_channels, down_block_types=down, up_block_types=up,
        layers_per_block=unet_cfg.layers_per_block, attention_head_dim=unet_cfg.num_attention_heads,
        cross_attention_dim=unet_cfg.cross_attention_dim, norm_num_groups=unet_cfg.norm_num_groups,
        norm_eps=unet_cfg.norm_eps,
    )
    n = len(vae_cfg.block_out_channels)
    vae = AutoencoderKL(
        in_channels=vae_cfg.in_channels, out_channels=vae_cfg.out_channels, latent_channels=vae_cfg.latent_channels,
        block_out_channels=vae_cfg.block_out_channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=vae_cfg.layers_per_block,
        norm_num_groups=vae_cfg.norm_num_groups, scaling_factor=vae_cfg.scaling_factor,
    )
    clip = build_clip_text_model(clip_cfg)
    for i, module in enumerate((unet, vae, clip)):
        perturb_(module, seed + i, scale=0.02 if module is clip else 0.05)
    return unet.eval(), vae.eval(), clip.eval()


def reference_pipeline(unet, vae, clip):
    """diffusers' TextToVideoZeroPipeline on these models, SD 1.5's DDIM scheduler, t2vz's shipped tokenizer and
    no safety checker (`safety_checker=None, feature_extractor=None, requires_safety_checker=False`)."""
    import diffusers

    from t2vz.text_encoder import load_tokenizer

    pipe = getattr(diffusers, PIPELINE_CLASS)(
        vae=vae, text_encoder=clip, tokenizer=load_tokenizer(), unet=unet,
        scheduler=diffusers.DDIMScheduler(**SD15_DDIM), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "model_index.json").is_file() and all(
        (path / c / "config.json").is_file() for c in ("unet", "vae", "text_encoder"))


def build_diffusers_folder(path: str | os.PathLike, size: str, seed: int = 0) -> Path:
    """Write the random `size` model as a diffusers folder at `path` (atomically: a temporary folder beside it,
    then one rename). The tokenizer files are t2vz's shipped ones (vocab.json, merges.txt, tokenizer_config.json)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # no "safety_checker=None cannot be saved" chatter
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe = reference_pipeline(*diffusers_models(size, seed))
        pipe.save_pretrained(tmp, safe_serialization=True)
        del pipe
        shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
        (tmp / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            shutil.copyfile(shipped_tokenizer_dir() / name, tmp / "tokenizer" / name)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_pipeline(folder: str | os.PathLike, device: torch.device, dtype: torch.dtype):
    """TextToVideoZeroPipeline.from_pretrained(folder), local files only, no safety checker, on device in dtype."""
    import diffusers

    pipe = getattr(diffusers, PIPELINE_CLASS).from_pretrained(
        str(folder), torch_dtype=dtype, local_files_only=True, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str, seed: int, num_frames: int, height: int, width: int, num_inference_steps: int,
             guidance_scale: float, motion_strength: float, t0: int, t1: int) -> torch.Tensor:
    """One video: frames (F, H, W, 3) float32 in [0, 1] on the CPU. λ = motion_strength along δ = (1, 1), i.e.
    motion_field_strength_x = motion_field_strength_y = λ (t2vz's defaults direction=(1, 1))."""
    out = pipe(prompt, video_length=num_frames, height=height, width=width,
               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               generator=torch.Generator().manual_seed(seed), motion_field_strength_x=motion_strength,
               motion_field_strength_y=motion_strength, t0=t0, t1=t1).images
    return torch.as_tensor(out).float()

"""The diffusers side of experiments/benchmark.py: one random SD 1.5-shaped model written as a diffusers folder,
and diffusers' `TextToVideoZeroPipeline` loaded from it and run. t2vz itself never imports diffusers; only this
file (and the benchmark's diffusers worker process) does.

`build_diffusers_folder` initialises diffusers' `UNet2DConditionModel` and `AutoencoderKL` and transformers'
`CLIPTextModel` with their default init under a seed, then moves every parameter off its default with the parity
tests' own builders (experiments/reference_models.py, `perturb_`), so that nothing in the comparison is trivially equal,
and saves them with SD 1.5's `DDIMScheduler` and the CLIP tokenizer files that ship with t2vz as a diffusers
folder (`model_index.json`, `unet/ vae/ text_encoder/ tokenizer/ scheduler/`). The shapes (`MODEL_SHAPES`) are
the parity tests' (experiments/reference_models.py): `tiny` (TINY_UNET, TINY_VAE, TINY_CLIP) and `sd15` (the full
SD 1.5 UNet, VAE and CLIP ViT-L/14 text transformer). t2vz reads the same weights after
`weights_convert.convert.convert(diffusers_folder, t2vz_folder)`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from t2vz.sd.model_folder import TOKENIZER_FILES
from t2vz.sd.text_encoder import shipped_tokenizer_dir

from reference_models import (
    SD15_CLIP, SD15_UNET, SD15_VAE, TINY_CLIP, TINY_UNET, TINY_VAE, clip_text_model, diffusers_unet, diffusers_vae,
    text_to_video_zero_pipeline)

# (UNet, VAE, CLIP text model) shapes: the parity tests' TINY_* and SD15_* configs
MODEL_SHAPES = {"tiny": (TINY_UNET, TINY_VAE, TINY_CLIP), "sd15": (SD15_UNET, SD15_VAE, SD15_CLIP)}
PIPELINE_CLASS = "TextToVideoZeroPipeline"


def diffusers_models(size: str, seed: int):
    """Random (perturbed) diffusers UNet, VAE and transformers CLIP text model of `size` ("tiny" or "sd15"),
    built by experiments/reference_models.py exactly as the parity tests build them."""
    if size not in MODEL_SHAPES:
        raise ValueError(f"model={size!r} is not one of {sorted(MODEL_SHAPES)}")
    unet_cfg, vae_cfg, clip_cfg = MODEL_SHAPES[size]
    torch.manual_seed(seed)  # the default inits before the perturbation
    return diffusers_unet(unet_cfg, seed), diffusers_vae(vae_cfg, seed + 1), clip_text_model(clip_cfg, seed + 2)


def reference_pipeline(unet, vae, clip):
    """diffusers' TextToVideoZeroPipeline on these models, SD 1.5's DDIM scheduler, t2vz's shipped tokenizer and
    no safety checker (experiments/reference_models.py)."""
    return text_to_video_zero_pipeline(unet, vae, clip)


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


def load_pipeline(folder: str | os.PathLike, device: torch.device, dtype: torch.dtype,
                  vae_dtype: torch.dtype | None = None):
    """TextToVideoZeroPipeline.from_pretrained(folder), local files only, no safety checker, on device in dtype,
    its VAE in `vae_dtype` (None: `dtype`, diffusers' own choice)."""
    import diffusers

    pipe = getattr(diffusers, PIPELINE_CLASS).from_pretrained(
        str(folder), torch_dtype=dtype, local_files_only=True, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe = pipe.to(device)
    if vae_dtype is not None and vae_dtype != dtype:
        cast_vae(pipe, vae_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cast_vae(pipe, vae_dtype: torch.dtype) -> None:
    """The pipeline's VAE in `vae_dtype`, its latents cast to it at `vae.decode`: the pipeline's `decode_latents`
    hands the VAE the UNet's latents as they are, and a float32 convolution refuses float16 input. (t2vz casts
    latents at the VAE's door the same way.)"""
    pipe.vae.to(dtype=vae_dtype)
    decode = pipe.vae.decode

    def decode_in_vae_dtype(z, *args, **kwargs):
        return decode(z.to(vae_dtype), *args, **kwargs)

    pipe.vae.decode = decode_in_vae_dtype


def generate(pipe, prompt: str, seed: int, num_frames: int, height: int, width: int, num_inference_steps: int,
             guidance_scale: float, motion_strength: float, t0: int, t1: int) -> torch.Tensor:
    """One video: frames (F, H, W, 3) float32 in [0, 1] on the CPU. λ = motion_strength along δ = (1, 1), i.e.
    motion_field_strength_x = motion_field_strength_y = λ (t2vz's defaults direction=(1, 1))."""
    out = pipe(prompt, video_length=num_frames, height=height, width=width,
               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               generator=torch.Generator().manual_seed(seed), motion_field_strength_x=motion_strength,
               motion_field_strength_y=motion_strength, t0=t0, t1=t1).images
    return torch.as_tensor(out).float()

"""t2vz: Text2Video-Zero (Khachatryan et al., ICCV 2023) on a hand-written Stable Diffusion 1.5 in plain PyTorch.

    import t2vz
    pipe = t2vz.TextToVideoZero.from_pretrained("toyworld")     # or a folder written by `python -m weights_convert`
    frames = pipe("a red circle on grass", generator=torch.Generator().manual_seed(0))   # (8, 64, 64, 3) in [0, 1]

The package in layers, each importing only from the ones before it:
    t2vz.sd          the Stable Diffusion 1.5 model: attention, resnet, UNet, VAE, text encoder, ControlNet,
                     DDIM/DDPM schedulers, the model folder and `load`
    t2vz.method      the method: the shared sampling loop, text-to-image, Text2Video-Zero (Algorithm 1), motion,
                     background smoothing, chunks, ControlVideo, Video Instruct-Pix2Pix, Canny
    t2vz.experiment  the experiment machinery: Hydra configs, runs, W&B tracking, metrics, reports, benchmarks
    t2vz.toyworld    the toy world, its judge and the shipped toy model's training recipe
    t2vz.video_io    reading and writing videos (used by every layer above the model)

The public names below are imported on first use, so `import t2vz` stays fast (torch and transformers load when
a model is built).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name → the module that defines it
_EXPORTS = {
    "AutoencoderKL": "t2vz.sd.vae", "VAEConfig": "t2vz.sd.vae",
    "UNet": "t2vz.sd.unet", "UNetConfig": "t2vz.sd.unet",
    "ControlNet": "t2vz.sd.controlnet", "ControlNetConfig": "t2vz.sd.controlnet",
    "CrossFrame": "t2vz.sd.attention",
    "StableDiffusion": "t2vz.sd.loading", "load": "t2vz.sd.loading", "load_controlnet": "t2vz.sd.loading",
    "ModelFolderError": "t2vz.sd.model_folder",
    "text_to_image": "t2vz.method.text_to_image",
    "TextToVideoZero": "t2vz.method.text2video_zero", "VideoOptions": "t2vz.method.text2video_zero",
    "ControlVideo": "t2vz.method.controlvideo",
    "VideoInstructPix2Pix": "t2vz.method.instruct",
    "TuneAVideo": "t2vz.method.tune_a_video",
    "canny_edges": "t2vz.method.canny",
}
_SUBPACKAGES = ("sd", "method", "experiment", "toyworld", "video_io")
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"t2vz.{name}")
    else:
        raise AttributeError(f"module 't2vz' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))

"""`t2vz.load`: a converted model folder (with LoRA files merged into its weights, `lora.py`) → the SD 1.5 or SDXL
components; `t2vz.load_controlnet`: a converted ControlNet folder → a ControlNet; both with strict key checks."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .controlnet import ControlNet, ControlNetConfig
from .lora import LoRA, as_loras, lora_records, merge_loras
from .model_folder import (
    CONTROLNET, FAMILY_COMPONENTS, SD15, SDXL, ModelFolderError, model_family, read_controlnet_config,
    read_model_config, read_state_dict, resolve_model_path,
)
from .model_folder import method_defaults as folder_method_defaults
from .onednn import note_reduced_precision, onednn_supports, prepack_convolutions
from .temporal import load_tuned
from .text_encoder import (
    SDXLTextEncoders, TextEncoder, build_clip_text_model, canonical_clip_state_dict, clip_state_dict_for,
    load_sdxl_tokenizer_2, load_tokenizer,
)
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

# the dtypes a model loads in, by their command-line names
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StableDiffusion:
    """The components of a latent text-to-image diffusion model, as `t2vz.load` returns them. For SDXL
    (`family` "sdxl") `text_encoder` is `SDXLTextEncoders`: prompts → (context, pooled)."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder | SDXLTextEncoders
    config: dict = field(default_factory=dict)
    lora: list[dict] = field(default_factory=list)  # the LoRAs merged in: file, sha256, scale (`lora.lora_records`)

    @property
    def family(self) -> str:
        """"sd15" (SD 1.x) or "sdxl": the model folder's "family" entry ("sd15" where absent)."""
        return model_family(self.config)

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def sample_size(self) -> int:
        """The image size (pixels) the model was trained at: `sample_size` of its folder if set, else 512 for SD 1.5
        and 1024 for SDXL."""
        return int(self.config.get("sample_size", 1024 if self.family == SDXL else 512))

    @property
    def method_defaults(self) -> dict:
        """λ (motion_strength), t0 and t1 where a call gives none: the paper's 12, 44, 47, or the model folder's
        own "method" entry (`model_folder.method_defaults`; the toy model warps at t0 = t1 = 8 with λ = 32)."""
        return folder_method_defaults(self.config)

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) with None replaced by the model's own size (`sample_size`)."""
        return (self.sample_size if height is None else height, self.sample_size if width is None else width)


def require_sd15(sd: StableDiffusion, pipeline: str) -> None:
    """ModelFolderError unless `sd` is an SD 1.x model: the pipelines built on SD 1.5's add-ons (ControlNet,
    InstructPix2Pix) have no SDXL form in t2vz."""
    if sd.family != SD15:
        raise ModelFolderError(f"{pipeline} runs on SD 1.5 models and this one is {sd.family}: use an SD 1.5-based "
                               "model folder (TextToVideoZero takes SDXL)")


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict=True, assign=True) with an error that lists the offending keys by name."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ModelFolderError(f"{where} does not match its config; " + "; ".join(parts) + ". Re-run the conversion.")
    module.load_state_dict(state_dict, strict=True, assign=True)


def build_loaded(cls, config, state_dict: dict[str, torch.Tensor], where: str = "state dict") -> nn.Module:
    """cls(config) built on the meta device (no init cost) and given `state_dict`'s tensors, strictly."""
    with torch.device("meta"):
        module = cls(config)
    load_strict(module, state_dict, where)
    return module


def vae_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype when the model runs in `dtype`: float32 for float16, else `dtype` itself.

    SD's VAE decoder reaches activations beyond float16's range (65504) on some latents, which decode to NaN,
    i.e. black frames (a known upstream failure: diffusers' `force_upcast`). It is 8% of SD 1.5's
    parameters (83.7M of 1.07G) and runs once per frame, so keeping it in float32 costs little; bfloat16 has
    float32's range and is kept. It matters doubly for SDXL: its VAE (the same architecture, retrained, scaling
    factor 0.13025) is the one whose float16 decode is known to give NaN, which is why SDXL base's
    vae/config.json sets diffusers' `force_upcast: true` and why fp16-fixed VAE re-releases exist; and at SDXL's
    1024² the decoder's activations are 4× those of 512²."""
    return torch.float32 if dtype == torch.float16 else dtype


def channels_last_for(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether convolutions run channels-last (NHWC) for this device and dtype: on the CPU in bfloat16 and float16.
    oneDNN's reduced-precision convolutions (AVX-512 BF16, AMX) work in NHWC and reorder an NCHW tensor at every
    call otherwise; a 3×3 SD-sized bf16 convolution ran 2.2× faster channels-last on a 2-core Xeon with AMX, and
    the bf16 SD 1.5 UNet about 1.15× (docs/performance.md). In float32 the layouts measured alike, and CUDA is left
    to cuDNN's defaults."""
    return torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def prepare_for_device(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """`module` with its 4-D weights channels-last where `channels_last_for(device, dtype)` (a convolution's output
    takes its weight's layout, so the activations follow without converting the inputs), and its convolutions'
    weights prepacked for oneDNN there (`onednn.PrepackedConv2d`) where the CPU's oneDNN supports the dtype
    (`onednn_supports`), elsewhere left `nn.Conv2d`s; where the dtype is slow on this CPU (no oneDNN kernels, or
    not the instructions that make them fast), the one-line `reduced_precision_note` is logged once.
    Values are unchanged."""
    if channels_last_for(device, dtype):
        module.to(memory_format=torch.channels_last)
        if onednn_supports(dtype):
            prepack_convolutions(module)
        note_reduced_precision(dtype)  # one line, once, where this dtype is slow on this CPU
    return module


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         vae_dtype: torch.dtype | None = None, lora=None, tuned: str | os.PathLike | None = None) -> StableDiffusion:
    """Read a t2vz model folder (written by `python -m weights_convert`, or a shipped model's name such as
    "toyworld") onto `device` in `dtype`, in eval mode. The VAE runs in `vae_dtype`, by default
    `vae_dtype_for(dtype)` (float32 under float16); latents are cast to it at the VAE's door.

    `lora`: [(file, scale), ...], LoRA files merged into the UNet and text encoder weights in float32 before the
    cast to `dtype`, W ← W + scale·(α/r)·up·down, several adding (`lora.py`; docs/lora.md). A LoRA that does not
    fit the model is refused with a LoraError (a ValueError) naming it.

    `tuned`: a Tune-A-Video weights file (`method.tune_a_video.save_tuned`): the UNet is inflated with temporal
    attention (`temporal.inflate`) and the file's tensors replace its own, before the cast to `dtype`. A file tuned
    from another base model (its base's unet.safetensors sha256 differs from this folder's) or that does not fit is
    refused with a TunedWeightsError (a ValueError) naming both (`temporal.load_tuned`). The file's metadata is
    `config["tuned"]` (its base, trainable modules, frame count and prompt)."""
    loras = as_loras(lora)
    path = resolve_model_path(path)
    meta = read_model_config(path)
    records = lora_records(loras)  # a missing LoRA file fails here, before any weights are read
    weights = folder_weights(path, meta, loras)
    unet = build_loaded(UNet, UNetConfig(**meta["unet"]), weights("unet"), f"{path}/unet.safetensors")
    if tuned is not None:  # in float32 (lossless for a folder stored in fp16), so the tuned tensors stay exact
        meta = {**meta, "tuned": {"file": str(tuned), **load_tuned(unet.float(), tuned, path)}}
    vae = build_loaded(AutoencoderKL, VAEConfig(**meta["vae"]), weights("vae"), f"{path}/vae.safetensors")
    text_encoder = build_text_encoder(path, meta, weights)
    for module, module_dtype in ((unet, dtype), (vae, vae_dtype or vae_dtype_for(dtype)), (text_encoder, dtype)):
        module.to(device=device, dtype=module_dtype).eval().requires_grad_(False)
        prepare_for_device(module, device, module_dtype)
    folder_method_defaults(meta)  # a bad "method" entry fails here, at load, not in the middle of a run
    return StableDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, config=meta, lora=records)


def folder_weights(path: Path, meta: dict, loras: list[LoRA] = ()):
    """weights(component) → that component's state dict from the folder, with `loras` merged into the UNet and the
    text encoder(s) (`lora.merge_loras`, which refuses a LoRA that does not fit before returning): the one place
    `load` reads weights."""
    if not loras:
        return lambda component: read_state_dict(path, component)
    merged = {c: read_state_dict(path, c) for c in FAMILY_COMPONENTS[model_family(meta)] if c != "vae"}
    merged = {c: canonical_clip_state_dict(sd) if c.startswith("text_encoder") else sd for c, sd in merged.items()}
    merged = merge_loras(merged, UNetConfig(**meta["unet"]), loras)
    return lambda component: merged[component] if component in merged else read_state_dict(path, component)


def load_clip(path: Path, meta: dict, weights, component: str, projection: bool = False) -> nn.Module:
    """The CLIP text model stored as `component` ("text_encoder", "text_encoder_2"), strictly loaded."""
    clip = build_clip_text_model(meta[component], projection=projection)
    load_strict(clip, clip_state_dict_for(clip, weights(component)), f"{path}/{component}.safetensors")
    return clip


def build_text_encoder(path: Path, meta: dict, weights) -> TextEncoder | SDXLTextEncoders:
    """SD 1.x: `TextEncoder` (CLIP ViT-L, tokenizer/); SDXL: `SDXLTextEncoders` (CLIP ViT-L and bigG with its
    projection, tokenizer/ and tokenizer_2/)."""
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    if model_family(meta) == SD15:
        return TextEncoder(load_clip(path, meta, weights, "text_encoder"), tokenizer)
    return SDXLTextEncoders(load_clip(path, meta, weights, "text_encoder"),
                            load_clip(path, meta, weights, "text_encoder_2", projection=True),
                            tokenizer, load_sdxl_tokenizer_2(os.path.join(path, "tokenizer_2")))


def load_controlnet(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> ControlNet:
    """Read a t2vz ControlNet folder (written by `python -m weights_convert` from a ControlNet checkpoint) onto
    `device` in `dtype`, in eval mode; its config is `.config` (a ControlNetConfig)."""
    path = Path(path)
    meta = read_controlnet_config(path)
    try:
        config = ControlNetConfig(**meta[CONTROLNET])
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"{path}/t2vz_model.json has an invalid controlnet config ({e}); re-run the "
                               "conversion") from None
    model = build_loaded(ControlNet, config, read_state_dict(path, CONTROLNET), f"{path}/controlnet.safetensors")
    return prepare_for_device(model.to(device=device, dtype=dtype), device, dtype).eval().requires_grad_(False)

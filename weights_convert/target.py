"""What a conversion must produce: t2vz's own key names and shapes, and the checks against them.

The expected keys come from t2vz's model classes built on the meta device (no memory, no init), so the converter
and `t2vz.load` can never disagree about a name.
"""
from __future__ import annotations

import dataclasses

import torch

from t2vz.sd.controlnet import ControlNet
from t2vz.sd.text_encoder import build_clip_text_model, canonical_clip_state_dict
from t2vz.sd.unet import UNet, UNetConfig
from t2vz.sd.vae import AutoencoderKL, VAEConfig

from weights_convert.checkpoint_io import ConversionError, dtype_name, name_list

# transformers.CLIPTextConfig kwargs stored in the model folder; the values SD 1.5's CLIP ViT-L/14 uses.
CLIP_DEFAULTS = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
CLIP_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim")
CLIP_HEAD_DIM = 64  # CLIP ViT-L/14: 768 = 12 heads × 64
SD2_CONTEXT_DIM = 1024  # OpenCLIP ViT-H/14: the text width of SD 2.x
VARIANTS = {4: "sd15", 8: "instruct-pix2pix", 9: "inpainting"}
SDXL_SAMPLE_SIZE = 1024  # SDXL base is trained at 1024²
SDXL_VAE_SCALING = 0.13025  # SDXL's VAE latent scaling factor (diffusers' vae/config.json of SDXL base)


def clip_config(vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                max_position_embeddings: int, **overrides) -> dict:
    """The text-encoder config dict (CLIPTextConfig kwargs); heads = hidden // 64 (one head below 64) unless given."""
    heads = hidden_size // CLIP_HEAD_DIM if hidden_size % CLIP_HEAD_DIM == 0 else 1
    cfg = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
               num_hidden_layers=num_hidden_layers, num_attention_heads=heads,
               max_position_embeddings=max_position_embeddings, projection_dim=hidden_size, **CLIP_DEFAULTS)
    cfg.update({k: v for k, v in overrides.items() if k in CLIP_KEYS and v is not None})
    return cfg


def expected_shapes(component: str, config) -> dict[str, torch.Size]:
    """t2vz's state-dict key → shape for `component` ("unet", "vae", "text_encoder", "text_encoder_2" (SDXL's
    CLIPTextModelWithProjection), "controlnet"), built on the meta device.

    The text encoders' keys are canonical CLIP keys (`text_model.*`, `text_projection.weight`) whichever
    transformers version is installed.
    """
    try:
        with torch.device("meta"):
            if component == "unet":
                model = UNet(config)
            elif component == "controlnet":
                model = ControlNet(config)
            elif component == "vae":
                model = AutoencoderKL(config)
            else:
                model = build_clip_text_model(config, projection=component == "text_encoder_2")
    except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. channels that 32 norm groups cannot divide
        raise ConversionError(f"t2vz cannot build the {component} this checkpoint describes ({config}): {e}") from None
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return canonical_clip_state_dict(shapes) if component.startswith("text_encoder") else shapes


def variant(in_channels: int, allow_inpainting: bool, where: str) -> str:
    """SD 1.x variant from the UNet's input channels: 4 plain, 8 InstructPix2Pix, 9 inpainting (opt-in)."""
    if in_channels == 9 and not allow_inpainting:
        raise ConversionError(
            f"{where} is an inpainting model (UNet with 9 input channels: latent, mask, masked image); t2vz's "
            "pipelines do not feed a mask. Pass --allow-inpainting to convert it anyway"
        )
    if in_channels not in VARIANTS:
        raise ConversionError(
            f"{where} has a UNet with {in_channels} input channels; t2vz converts SD 1.x models with 4 "
            "(text-to-image), 8 (InstructPix2Pix) or 9 (inpainting)"
        )
    return VARIANTS[in_channels]


def refuse_sd2(where: str, why: str, model: str = "model") -> ConversionError:
    return ConversionError(
        f"{where} is a Stable Diffusion 2.x {model} ({why}); t2vz implements SD 1.x (CLIP ViT-L/14, 768-dim text). "
        "Use an SD 1.5-based checkpoint"
    )


def check_keys(where: str, components: dict, unexpected: list[str], hint: str = "",
               what: str = "an SD 1.x model") -> None:
    """Raise one ConversionError listing missing keys, unexpected keys and wrong shapes, by their names in the file.

    components: name → (found, expected, source_name) with found: t2vz key → tensor, expected: t2vz key → shape,
    source_name: t2vz key → the key it was looked up as. unexpected: keys of the file that nothing used.
    """
    missing, wrong = [], []
    for found, expected, source_name in components.values():
        missing += [source_name.get(k, k) for k in expected if k not in found]
        wrong += [f"{source_name.get(k, k)} has shape {tuple(found[k].shape)}, expected {tuple(s)}"
                  for k, s in expected.items() if k in found and found[k].shape != s]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {name_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {name_list(sorted(unexpected))}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes: {name_list(wrong, 4)}")
    if problems:
        raise ConversionError(
            f"{where} does not match {what}: " + "; ".join(problems)
            + (hint or ". Is the file complete, and an SD 1.x model rather than a LoRA, VAE or merge fragment?")
        )


def config_dicts(unet: UNetConfig, vae: VAEConfig, text_encoder: dict) -> dict:
    """The model folder's config entries, after checking that the text encoder's width feeds the UNet."""
    if text_encoder["hidden_size"] != unet.cross_attention_dim:
        raise ConversionError(
            f"the text encoder's width {text_encoder['hidden_size']} does not match the UNet's cross-attention "
            f"dim {unet.cross_attention_dim}: the components come from different models"
        )
    return {"family": "sd15", "unet": dataclasses.asdict(unet), "vae": dataclasses.asdict(vae),
            "text_encoder": dict(text_encoder)}


def sdxl_config_dicts(unet: UNetConfig, vae: VAEConfig, text_encoder: dict, text_encoder_2: dict) -> dict:
    """An SDXL model folder's config entries (family "sdxl", sample_size 1024), after checking that the two text
    encoders' widths make the UNet's context and the second's pooled width plus six size/crop sinusoids its added
    embedding's input."""
    context = text_encoder["hidden_size"] + text_encoder_2["hidden_size"]
    if context != unet.cross_attention_dim:
        raise ConversionError(
            f"the text encoders' widths {text_encoder['hidden_size']} + {text_encoder_2['hidden_size']} do not match "
            f"the UNet's cross-attention dim {unet.cross_attention_dim}: the components come from different models"
        )
    added = text_encoder_2["projection_dim"] + 6 * unet.addition_time_embed_dim
    if unet.addition_embed_type != "text_time" or added != unet.projection_class_embeddings_input_dim:
        raise ConversionError(
            f"the UNet's added embedding takes {unet.projection_class_embeddings_input_dim} features, not the "
            f"{text_encoder_2['projection_dim']}-wide pooled text embedding and 6 × {unet.addition_time_embed_dim} "
            "size/crop features of an SDXL base model: the components come from different models"
        )
    return {"family": "sdxl", "sample_size": SDXL_SAMPLE_SIZE, "unet": dataclasses.asdict(unet),
            "vae": dataclasses.asdict(vae), "text_encoder": dict(text_encoder), "text_encoder_2": dict(text_encoder_2)}


@dataclasses.dataclass
class Source:
    """A checkpoint read into t2vz names and checked, before the dtype cast and the write."""

    layout: str  # "single-file" | "diffusers"
    # "unet": UNetConfig, "vae": VAEConfig, "text_encoder" (SDXL: and "text_encoder_2"): CLIPTextConfig kwargs
    configs: dict
    state_dicts: dict[str, dict[str, torch.Tensor]]
    variant: str
    ema: bool = False
    tokenizer_dir: object = None  # the checkpoint's own tokenizer folder, if it has one
    tokenizer_2_dir: object = None  # SDXL: the checkpoint's own second tokenizer folder, if it has one
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def dtype(self) -> str:
        return dtype_name(t for sd in self.state_dicts.values() for t in sd.values())

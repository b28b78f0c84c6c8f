"""diffusers SD 1.x folders (`unet/ vae/ text_encoder/ tokenizer/ scheduler/`) and SDXL base folders (also
`text_encoder_2/ tokenizer_2/`) → t2vz names, nearly by identity.

t2vz's attribute names are diffusers' keys. The exceptions: old diffusers VAEs name their attention
`query/key/value/proj_attn` (now `to_q/to_k/to_v/to_out.0`), and transformers ≥ 5 writes CLIP without the
`text_model.` level and older versions with a `position_ids` buffer; both become canonical CLIP keys.
SDXL's text_encoder_2 is a CLIPTextModelWithProjection, its keys `text_model.*` and `text_projection.weight`.
The SDXL refiner (text_encoder_2/ without text_encoder/) and SDXL inpainting (UNet in_channels 9) are refused.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from t2vz.sd.text_encoder import canonical_clip_state_dict
from t2vz.sd.unet import UNetConfig
from t2vz.sd.vae import VAEConfig

from weights_convert.checkpoint_io import ConversionError, read_weights
from weights_convert.ldm import conv1x1_to_linear
from weights_convert.target import (
    CLIP_KEYS, SD2_CONTEXT_DIM, Source, check_keys, clip_config, expected_shapes, refuse_sd2, variant,
)

COMPONENTS = ("unet", "vae", "text_encoder")
SDXL_COMPONENTS = (*COMPONENTS, "text_encoder_2")
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
SUFFIXES = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin")  # full precision first
OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# UNet2DConditionModel options that change the architecture away from SD 1.x's; their SD 1.x values.
UNET_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None, "num_class_embeds": None,
    "time_embedding_type": "positional", "time_cond_proj_dim": None, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "dual_cross_attention": False, "transformer_layers_per_block": 1,
    "resnet_time_scale_shift": "default", "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "cross_attention_norm": None,
    "timestep_post_act": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
}
# SDXL base's values of the options SD 1.x fixes otherwise (its per-level transformer depth is read, not fixed)
UNET_FIXED_SDXL = {**{k: v for k, v in UNET_FIXED.items() if k != "transformer_layers_per_block"},
                   "addition_embed_type": "text_time", "reverse_transformer_layers_per_block": None}
VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}


def is_diffusers_folder(path: Path) -> bool:
    """unet/, vae/ and a text encoder, each with a config.json (text_encoder_2/ alone: the SDXL refiner, refused
    when read)."""
    has = [(path / c / "config.json").is_file() for c in SDXL_COMPONENTS]
    return path.is_dir() and has[0] and has[1] and (has[2] or has[3])


def is_sdxl_folder(folder: Path) -> bool:
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    return (folder / "text_encoder_2").is_dir() or "XL" in str(index.get("_class_name", ""))


def refuse_sdxl_variants(folder: Path, unet: dict, where: str) -> None:
    """The SDXL refiner (no text_encoder/, one OpenCLIP encoder) and SDXL inpainting, refused by name."""
    base = "t2vz takes the SDXL base model (stable-diffusion-xl-base-1.0 or a model fine-tuned from it)"
    if not (folder / "text_encoder" / "config.json").is_file():
        raise ConversionError(f"{where} is the Stable Diffusion XL refiner (text_encoder_2/ without text_encoder/, "
                              f"a {unet.get('block_out_channels', ['?'])[0]}-channel UNet), which refines the base "
                              f"model's latents with an aesthetic score; {base}")
    if unet.get("in_channels") == 9:
        raise ConversionError(f"{where} is Stable Diffusion XL inpainting (unet/config.json in_channels 9: latent, "
                              f"mask, masked image); t2vz's pipelines feed no mask, and {base}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} cannot be read as JSON ({e}); the diffusers folder is damaged") from None


def weights_file(folder: Path, component: str) -> Path:
    tried = [folder / component / (WEIGHT_STEMS[component] + s) for s in SUFFIXES]
    for file in tried:
        if file.is_file():
            return file
    raise ConversionError(f"{folder / component} has no weights: looked for {', '.join(f.name for f in tried)}")


def refuse_other_pipelines(folder: Path, unet: dict, vae: dict, text: dict, where: str) -> None:
    """Refuse SD 2.x and UNet/VAE options t2vz does not build (SDXL folders are checked by `check_sdxl_configs`)."""
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ConversionError(f"{where}/unet is a {unet['_class_name']}, not an SD 1.x UNet2DConditionModel")
    context = unet.get("cross_attention_dim")
    if context == SD2_CONTEXT_DIM or text.get("hidden_size") == SD2_CONTEXT_DIM:
        raise refuse_sd2(where, f"{SD2_CONTEXT_DIM}-dim cross-attention context")
    if unet.get("use_linear_projection"):
        raise refuse_sd2(where, "use_linear_projection: true in unet/config.json")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file() and read_json(scheduler).get("prediction_type") == "v_prediction":
        raise refuse_sd2(where, "scheduler prediction_type v_prediction; t2vz's samplers predict the noise")
    check_fixed(where, unet, vae, UNET_FIXED, "SD 1.x")
    lacking = [k for k in ("block_out_channels", "cross_attention_dim", "down_block_types") if k not in unet]
    if lacking or not isinstance(context, int):
        raise ConversionError(f"{where}/unet/config.json lacks {lacking or 'an integer cross_attention_dim'}; "
                              "it is not an SD 1.x UNet config")


def check_fixed(where: str, unet: dict, vae: dict, unet_fixed: dict, family: str) -> None:
    for name, cfg, fixed in (("unet", unet, unet_fixed), ("vae", vae, VAE_FIXED)):
        odd = {k: cfg[k] for k, v in fixed.items() if k in cfg and cfg[k] != v}
        if odd:
            raise ConversionError(f"{where}/{name}/config.json describes a model t2vz does not build: {odd}, where "
                                  f"{family} has {({k: fixed[k] for k in odd})}")


def sdxl_unet_config(cfg: dict, where: str) -> UNetConfig:
    """UNetConfig from an SDXL unet/config.json. As in diffusers, `attention_head_dim` ([5, 10, 20]) is the number
    of heads per level when `num_attention_heads` is null."""
    lacking = [k for k in ("block_out_channels", "cross_attention_dim", "down_block_types",
                           "addition_time_embed_dim", "projection_class_embeddings_input_dim") if k not in cfg]
    if lacking:
        raise ConversionError(f"{where}/unet/config.json lacks {lacking}; it is not an SDXL UNet config")
    base = unet_config(cfg, where, sdxl=True)
    try:
        return UNetConfig(
            **{k: getattr(base, k) for k in ("in_channels", "out_channels", "block_out_channels", "attention_levels",
                                             "layers_per_block", "num_attention_heads", "cross_attention_dim",
                                             "norm_num_groups", "norm_eps")},
            transformer_layers_per_block=cfg.get("transformer_layers_per_block", 1),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)), addition_embed_type="text_time",
            addition_time_embed_dim=cfg["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=cfg["projection_class_embeddings_input_dim"],
        )
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}/unet/config.json does not describe an SDXL UNet t2vz builds ({e})") from None


def unet_config(cfg: dict, where: str, file: str = "unet/config.json", sdxl: bool = False) -> UNetConfig:
    """UNetConfig from unet/config.json (`file`: the config's path in the folder, for messages). In SD 1.x,
    diffusers' `attention_head_dim` (8) is the number of heads."""
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    down = list(cfg.get("down_block_types", ()))
    levels = ["CrossAttn" in t for t in down]
    up_expected = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)]
    per_level = sdxl and isinstance(heads, (list, tuple)) and all(isinstance(h, int) for h in heads)
    if not (isinstance(heads, int) or per_level) or list(cfg.get("up_block_types", up_expected)) != up_expected:
        raise ConversionError(f"{where}/{file}: attention heads {heads!r}, down blocks {down}, up blocks "
                              f"{cfg.get('up_block_types')} do not describe an {'SDXL' if sdxl else 'SD 1.x'} UNet")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
        block_out_channels=cfg["block_out_channels"], attention_levels=levels,
        layers_per_block=cfg.get("layers_per_block", 2), num_attention_heads=heads,
        cross_attention_dim=cfg["cross_attention_dim"], norm_num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
    )


def vae_config(cfg: dict) -> VAEConfig:
    return VAEConfig(**{k: cfg[k] for k in ("in_channels", "out_channels", "latent_channels", "block_out_channels",
                                             "layers_per_block", "norm_num_groups", "scaling_factor") if k in cfg})


def text_config(cfg: dict, where: str, component: str = "text_encoder") -> dict:
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings")
    lacking = [k for k in required if k not in cfg]
    if lacking:
        raise ConversionError(f"{where}/{component}/config.json lacks {lacking}; it is not a CLIP text model config")
    return clip_config(**{k: cfg[k] for k in required}, **{k: cfg.get(k) for k in CLIP_KEYS if k not in required})


def t2vz_names(component: str, sd: dict) -> dict:
    """The folder's keys → t2vz keys (identity but for the exceptions in the module docstring)."""
    if component == "vae":
        old = re.compile(r"(attentions\.\d+\.)(query|key|value|proj_attn)\.")
        return {old.sub(lambda m: m.group(1) + OLD_VAE_ATTENTION[m.group(2)] + ".", k): k for k in sd}
    if component.startswith("text_encoder"):
        return canonical_clip_state_dict({k: k for k in sd})  # canonical name → the folder's name
    return {k: k for k in sd}


def read_diffusers_folder(folder: str | Path, allow_inpainting: bool = False) -> Source:
    """Read and check a diffusers SD 1.x or SDXL base folder; the weights may be .safetensors or .bin, fp32 or the
    fp16 variant."""
    folder = Path(folder)
    where = str(folder)
    sdxl = is_sdxl_folder(folder)
    if sdxl:
        unet = read_json(folder / "unet" / "config.json")
        refuse_sdxl_variants(folder, unet, where)
        components = SDXL_COMPONENTS
        lacking = [c for c in components if not (folder / c / "config.json").is_file()]
        if lacking:
            raise ConversionError(f"{where} is a Stable Diffusion XL folder without {', '.join(lacking)}/config.json; "
                                  "t2vz converts a whole SDXL base folder (unet, vae, text_encoder, text_encoder_2)")
        raw = {c: read_json(folder / c / "config.json") for c in components}
        check_fixed(where, raw["unet"], raw["vae"], UNET_FIXED_SDXL, "SDXL base")
        configs = {"unet": sdxl_unet_config(raw["unet"], where), "vae": vae_config(raw["vae"]),
                   **{c: text_config(raw[c], where, c) for c in components[2:]}}
        kind = "sdxl"
    else:
        components = COMPONENTS
        raw = {c: read_json(folder / c / "config.json") for c in components}
        refuse_other_pipelines(folder, raw["unet"], raw["vae"], raw["text_encoder"], where)
        configs = {"unet": unet_config(raw["unet"], where), "vae": vae_config(raw["vae"]),
                   "text_encoder": text_config(raw["text_encoder"], where)}
        kind = variant(configs["unet"].in_channels, allow_inpainting, where)

    state_dicts, checks, unexpected, files = {}, {}, [], {}
    for c in components:
        files[c] = weights_file(folder, c)
        sd = read_weights(files[c])
        names = t2vz_names(c, sd)  # t2vz key → key in the file
        expected = expected_shapes(c, configs[c])
        found = {k: sd[n] for k, n in names.items() if k in expected}
        if c == "vae":
            found = {k: conv1x1_to_linear(t) if ".attentions." in k else t for k, t in found.items()}
        unexpected += [f"{c}/{n}" for k, n in names.items() if k not in expected]
        checks[c] = (found, expected, {k: f"{c}/{names.get(k, k)}" for k in expected})
        state_dicts[c] = found
    check_keys(where, checks, unexpected, what="an SDXL base model" if sdxl else "an SD 1.x model")

    tokenizers = [folder / t if (folder / t / "vocab.json").is_file() and (folder / t / "merges.txt").is_file()
                  else None for t in ("tokenizer", "tokenizer_2")]
    notes = [f"weights: {', '.join(str(f.relative_to(folder)) for f in files.values())}"]
    if any(".query." in n for n in checks["vae"][2].values()):
        notes.append("VAE attention under its old diffusers names (query/key/value/proj_attn), renamed")
    return Source("diffusers", configs, state_dicts, kind, ema=False, tokenizer_dir=tokenizers[0],
                  tokenizer_2_dir=tokenizers[1] if sdxl else None, notes=notes)

"""SD 1.x ControlNet checkpoints → t2vz names (diffusers' `ControlNetModel` keys, `t2vz.sd.controlnet.ControlNet`).

Two sources:

- an original single file (lllyasviel's `cldm` layout): the ControlNet under `control_model.*` — alone
  (`control_v11p_sd15_*.pth`), or beside the whole SD model it was trained with (`control_sd15_*.pth`, whose
  `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` are left out);
- a diffusers ControlNet folder: `config.json` with `_class_name: ControlNetModel` and
  `diffusion_pytorch_model.safetensors` (or .bin / the .fp16 variant), converted by identity.

The single file's encoder (`time_embed`, `input_blocks`, `middle_block`) maps as the UNet's does (`ldm.unet_rules`);
the ControlNet's own modules:

=====================================  ==================================================================
t2vz / diffusers                       cldm
=====================================  ==================================================================
controlnet_cond_embedding.conv_in      input_hint_block.0        (odd indices are the parameterless SiLUs)
controlnet_cond_embedding.blocks.j     input_hint_block.(2j + 2)
controlnet_cond_embedding.conv_out     input_hint_block.(2·blocks + 2)   14 for SD 1.5's widths (16, 32, 96, 256)
controlnet_down_blocks.N               zero_convs.N.0
controlnet_mid_block                   middle_block_out.0
=====================================  ==================================================================
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from t2vz.sd.controlnet import ControlNetConfig

from weights_convert.checkpoint_io import ConversionError, name_list, read_weights
from weights_convert.diffusers_folder import SUFFIXES, UNET_FIXED, read_json, unet_config
from weights_convert.ldm import NON_WEIGHTS, indices, ldm_name, read_encoder_config, shape_reader, unet_rules
from weights_convert.target import SD2_CONTEXT_DIM, Source, check_keys, expected_shapes, refuse_sd2

CONTROL = "control_model."
HINT = "input_hint_block."
VARIANT = "controlnet-sd15"
WEIGHTS_STEM = "diffusion_pytorch_model"
# ControlNetModel options that change what the network computes, with the values t2vz's ControlNet implements.
CONTROLNET_FIXED = {**UNET_FIXED, "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False,
                    "encoder_hid_dim_type": None, "upcast_attention": False}
HINT_NOTE = "is it a complete ControlNet checkpoint?"


def controlnet_prefix(sd) -> str | None:
    """The prefix of a single file's ControlNet keys: "control_model." (lllyasviel's files), "" (a bare cldm state
    dict with `input_hint_block.*` and `zero_convs.*` at the top), or None when the file is no ControlNet."""
    if any(k.startswith(CONTROL) for k in sd):
        return CONTROL
    if any(k.startswith(HINT) for k in sd) and any(k.startswith("zero_convs.") for k in sd):
        return ""
    return None


def is_controlnet_file(sd) -> bool:
    return controlnet_prefix(sd) is not None


def read_controlnet_config(sd, prefix: str, where: str) -> ControlNetConfig:
    """The ControlNetConfig from the tensor shapes of the ControlNet keys under `prefix`; refuses SD 2.x and SDXL."""
    if any(k.startswith((prefix + "label_emb.", prefix + "add_embedding.")) for k in sd):
        raise ConversionError(f"{where} is a Stable Diffusion XL ControlNet (label_emb keys); t2vz implements "
                              "SD 1.x. Use a ControlNet trained on SD 1.5")
    need = shape_reader(sd, where, HINT_NOTE)
    encoder = read_encoder_config(sd, prefix, where, need, "ControlNet")
    hint = prefix + HINT
    convs = sorted(indices(sd, hint, hint.count(".")))
    blocks = len(convs) - 2  # conv_in, blocks, conv_out
    if blocks < 0 or blocks % 2 or convs != list(range(0, 2 * len(convs), 2)):
        raise ConversionError(f"{where}: cannot read the control-image embedding from its convs "
                              f"{hint}{{{', '.join(map(str, convs))}}}; a ControlNet has input_hint_block.0, 2, 4, "
                              "... (3×3 convs between SiLUs) with an even number of convs between the first and last")
    conv_in = need(f"{hint}0.weight", "control-image embedding")
    widths = [conv_in.shape[0]] + [need(f"{hint}{2 * j + 2}.weight", "control-image embedding").shape[0]
                                   for j in range(1, blocks, 2)]  # the stride-2 convs: blocks 1, 3, ...
    return ControlNetConfig(**encoder, conditioning_channels=conv_in.shape[1],
                            conditioning_embedding_out_channels=tuple(widths))


def cldm_name(key: str, cfg: ControlNetConfig) -> str:
    """One t2vz ControlNet key → its key in the cldm state dict (without the control_model. prefix)."""
    module, _, param = key.rpartition(".")
    embedding = "controlnet_cond_embedding."
    if module == embedding + "conv_in":
        return f"{HINT}0.{param}"
    if module == embedding + "conv_out":
        blocks = 2 * (len(cfg.conditioning_embedding_out_channels) - 1)
        return f"{HINT}{2 * blocks + 2}.{param}"
    m = re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module)
    if m:
        return f"{HINT}{2 * int(m.group(1)) + 2}.{param}"
    m = re.fullmatch(r"controlnet_down_blocks\.(\d+)", module)
    if m:
        return f"zero_convs.{m.group(1)}.0.{param}"
    if module == "controlnet_mid_block":
        return f"middle_block_out.0.{param}"
    return ldm_name(key, unet_rules(cfg))  # the encoder: conv_in, time_embedding, down_blocks, mid_block


def read_controlnet_file(path: str | Path, weights=None) -> Source:
    """Read and check an original SD 1.x ControlNet file; `weights`: its tensors when already read."""
    where = str(path)
    sd = read_weights(path) if weights is None else weights
    prefix = controlnet_prefix(sd)
    if prefix is None:
        raise ConversionError(f"{where} has no ControlNet weights (control_model.* keys); its keys begin: "
                              f"{name_list(list(sd), 4)}")
    cfg = read_controlnet_config(sd, prefix, where)
    expected = expected_shapes("controlnet", cfg)
    names = {k: prefix + cldm_name(k, cfg) for k in expected}
    found = {k: sd[n] for k, n in names.items() if n in sd}
    used = set(names.values())
    # A full file (control_sd15_*.pth) also holds the SD model it was trained with: not part of the ControlNet.
    base = [k for k in sd if prefix and not k.startswith(prefix)]
    unexpected = [k for k in sd if k not in used and k not in NON_WEIGHTS and not (prefix and not k.startswith(prefix))]
    check_keys(where, {"controlnet": (found, expected, names)}, unexpected,
               ". Is the file a complete SD 1.x ControlNet?", "an SD 1.x ControlNet")
    notes = [f"ControlNet ({'control_model.* keys' if prefix else 'cldm keys without a prefix'}): "
             f"{cfg.conditioning_channels}-channel control image, embedding widths "
             f"{list(cfg.conditioning_embedding_out_channels)}, encoder {list(cfg.block_out_channels)}"]
    if base:
        notes.append(f"left out the {len(base)} tensors besides control_model.* (the SD model the ControlNet was "
                     "trained with); convert an SD 1.5 model separately for t2vz.load")
    return Source("single-file", {"controlnet": cfg}, {"controlnet": found}, VARIANT, notes=notes)


def is_controlnet_folder(path: Path) -> bool:
    """A diffusers model folder whose config.json names a ControlNet class."""
    cfg = path / "config.json"
    return path.is_dir() and cfg.is_file() and "ControlNet" in str(read_json(cfg).get("_class_name", ""))


def read_controlnet_folder(folder: str | Path) -> Source:
    """Read and check a diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.*)."""
    folder = Path(folder)
    where = str(folder)
    raw = read_json(folder / "config.json")
    if raw.get("_class_name") != "ControlNetModel":
        raise ConversionError(f"{where}/config.json describes a {raw.get('_class_name')}; t2vz converts diffusers' "
                              "ControlNetModel (SD 1.x ControlNets)")
    if raw.get("cross_attention_dim") == SD2_CONTEXT_DIM:
        raise refuse_sd2(where, f"{SD2_CONTEXT_DIM}-dim cross-attention context", "ControlNet")
    if raw.get("use_linear_projection"):
        raise refuse_sd2(where, "use_linear_projection: true in config.json", "ControlNet")
    odd = {k: raw[k] for k, v in CONTROLNET_FIXED.items() if k in raw and raw[k] != v}
    if odd:
        raise ConversionError(f"{where}/config.json describes a ControlNet t2vz does not build: {odd}, where SD 1.x "
                              f"ControlNets have {({k: CONTROLNET_FIXED[k] for k in odd})}")
    if not isinstance(raw.get("cross_attention_dim"), int) or "block_out_channels" not in raw:
        raise ConversionError(f"{where}/config.json lacks block_out_channels or an integer cross_attention_dim; it "
                              "is not an SD 1.x ControlNet config")
    unet = unet_config({"down_block_types": ("CrossAttnDownBlock2D",) * len(raw["block_out_channels"]), **raw},
                       where, "config.json")
    extra = {k: (tuple(raw[k]) if isinstance(raw[k], list) else raw[k])
             for k in ("conditioning_channels", "conditioning_embedding_out_channels") if k in raw}
    cfg = ControlNetConfig.from_unet(unet, **extra)

    tried = [folder / (WEIGHTS_STEM + s) for s in SUFFIXES]
    file = next((f for f in tried if f.is_file()), None)
    if file is None:
        raise ConversionError(f"{where} has no weights: looked for {', '.join(f.name for f in tried)}")
    sd = read_weights(file)
    expected = expected_shapes("controlnet", cfg)
    found = {k: sd[k] for k in expected if k in sd}
    check_keys(where, {"controlnet": (found, expected, {})}, [k for k in sd if k not in expected],
               ". Does the weights file belong to this config.json?", "an SD 1.x ControlNet")
    notes = [f"ControlNet (diffusers ControlNetModel, weights {file.name}): {cfg.conditioning_channels}-channel "
             f"control image, embedding widths {list(cfg.conditioning_embedding_out_channels)}, "
             f"encoder {list(cfg.block_out_channels)}"]
    return Source("diffusers", {"controlnet": cfg}, {"controlnet": found}, VARIANT, notes=notes)


def controlnet_config_dict(cfg: ControlNetConfig) -> dict:
    return {"controlnet": dataclasses.asdict(cfg)}

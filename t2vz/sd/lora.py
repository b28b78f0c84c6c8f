"""LoRA files (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") merged into a model's weights
at load time.

A LoRA stores, for some linear or convolution layers W (out × in, or out × in × k × k), a low-rank update: `down`
A (r × in[·k·k]) and `up` B (out × r[×1×1]), and optionally α. Merging at scale s (Hu et al. Eq. 3 and Sec. 4.1,
ΔW = (α / r)·B·A):

    W ← W + s · (α / r) · B @ A      (α absent: α = r)

done in float32 before the model is cast to its dtype; several LoRAs add their ΔW. The merged model runs at the
base model's speed: no extra layers stay in the network.

Two file layouts are read (`parse_lora`):

- kohya (sd-scripts, the usual community files): `lora_unet_<module>`, `lora_te_<module>` (SD 1.5's text
  encoder), `lora_te1_`/`lora_te2_` (SDXL's two), each with `.lora_down.weight`, `.lora_up.weight` and `.alpha`.
  The module is a dotted name with its dots made underscores: SD 1.5 UNets and the text encoders use diffusers' and
  transformers' names (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`), SDXL UNets the SGM (original
  Stability) names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`). They are resolved through a table
  built from the model's own state-dict keys (`kohya_table`), never by guessing where the underscores were dots;
  SGM names through `sgm_module`, the block arithmetic of the original UNet.
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also `text_encoder.`, `text_encoder_2.`), α
  from a `.alpha` tensor or the `lora_adapter_metadata` diffusers writes into the file's header; and the older
  diffusers names `<module>.lora.down.weight`, `<module>.lora_linear_layer.down.weight` and
  `<attention>.processor.to_q_lora.down.weight`.

Everything here works on state dicts ({"unet": ..., "text_encoder": ..., "text_encoder_2": ...}, text-encoder keys
as CLIP checkpoints store them, `text_model.*`) and the UNetConfig, so it needs no built modules.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .model_folder import SD15, SDXL
from .unet import UNetConfig

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
FAMILY_NAMES = {SD15: "SD 1.5", SDXL: "SDXL"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
MODULE_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
                "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
# diffusers' attention-processor LoRA (its first format): `attn1.processor.to_out_lora.up.weight` → `attn1.to_out.0`
PROCESSOR_KEY = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
# Adapters that are not W + B·A: a pattern of their keys, and what they are
OTHER_ADAPTERS = {r"\.hada_w1_a$": "LoHa", r"\.lokr_w1(_a)?$": "LoKr",
                  r"\.lora_mid\.weight$": "LoCon with a Tucker middle factor", r"\.dora_scale$": "DoRA",
                  r"\.lora_magnitude_vector": "DoRA", r"\.oft_(blocks|diag)": "OFT",
                  r"\.diff(_b)?$": "full weight diff"}
SHOWN = 4  # keys quoted in an error


class LoraError(ValueError):
    """A LoRA that cannot be merged into the model: the message names the file, what is wrong and what to do."""


@dataclass(frozen=True)
class LoRA:
    """One LoRA file and the scale s it is merged at."""

    file: Path
    scale: float = 1.0


@dataclass
class LoraLayer:
    """One layer's update: the module it changes (resolved: a key of the component's state dict minus `.weight`)."""

    component: str
    module: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    keys: tuple[str, ...]  # the file's keys, for errors


# ------------------------------------------------------------------------------------------ the user's entries
def check_scale(scale, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"{what}: the scale {scale!r} must be a finite number (1.0: the LoRA as trained)")
    return float(scale)


def as_loras(lora) -> list[LoRA]:
    """The `lora=` argument of `t2vz.load` and the pipelines: None, or a list of (file, scale) pairs (a bare file
    is scale 1.0) → LoRA entries, each scale checked finite."""
    if lora is None:
        return []
    if isinstance(lora, (str, os.PathLike, LoRA)) or (isinstance(lora, tuple) and len(lora) == 2
                                                      and isinstance(lora[1], (int, float))):
        lora = [lora]
    out = []
    for entry in lora:
        if isinstance(entry, LoRA):
            entry = (entry.file, entry.scale)
        elif isinstance(entry, (str, os.PathLike)):
            entry = (entry, 1.0)
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], (str, os.PathLike))):
            raise LoraError(f"lora entry {entry!r} must be a (file, scale) pair, e.g. ('style.safetensors', 0.8)")
        out.append(LoRA(Path(entry[0]), check_scale(entry[1], f"lora entry {entry[0]}")))
    return out


def parse_lora_entry(entry: str) -> LoRA:
    """A command-line entry `FILE` or `FILE:SCALE` → a LoRA; LoraError naming the entry when SCALE is not a finite
    number or FILE is empty."""
    text = str(entry).strip()
    file, sep, scale = text.rpartition(":")
    if not sep:
        file, scale = text, "1.0"
    if not file:
        raise LoraError(f"lora entry {entry!r} has no file; write FILE or FILE:SCALE, e.g. style.safetensors:0.8")
    try:
        value = float(scale)
    except ValueError:
        raise LoraError(f"lora entry {entry!r}: the scale {scale!r} is not a number; write FILE or FILE:SCALE, e.g. "
                        "style.safetensors:0.8") from None
    return LoRA(Path(file), check_scale(value, f"lora entry {entry!r}"))


def parse_lora_entries(entries) -> list[LoRA]:
    """The command line's `lora=[FILE:SCALE,...]` → LoRA entries (empty for None or [])."""
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [entries]
    return [parse_lora_entry(e) for e in entries]


def file_sha256(file: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_lora_file(file: Path) -> None:
    if not file.is_file():
        raise LoraError(f"LoRA file {file} {'is a folder' if file.is_dir() else 'does not exist'}; pass the "
                        "LoRA's .safetensors file")


def lora_records(loras: list[LoRA]) -> list[dict]:
    """What run.json records of each LoRA: its file, sha256 and scale. LoraError for a file that is missing."""
    for lora in loras:
        check_lora_file(lora.file)
    return [{"file": str(lora.file), "sha256": file_sha256(lora.file), "scale": lora.scale} for lora in loras]


# ----------------------------------------------------------------------------------------------- reading a file
def read_lora_file(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file's tensors and its safetensors header metadata. .safetensors preferred; a PyTorch file is read with
    torch.load(weights_only=True), so a pickle that needs Python objects is refused, never executed."""
    path = Path(file)
    check_lora_file(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        try:
            with safe_open(str(path), framework="pt") as sf:
                return {k: sf.get_tensor(k) for k in sf.keys()}, sf.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise LoraError(f"LoRA {path} is a truncated or corrupt .safetensors file ({e}); download it "
                            "again") from None
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        raise LoraError(f"LoRA {path} is neither a .safetensors file nor a PyTorch file (it starts with {head[:8]!r})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as e:
        if "Weights only load failed" in str(e) or "GLOBAL" in str(e):
            raise LoraError(f"LoRA {path} is a pickle holding Python objects that are not tensors; it is refused "
                            "because loading it would run code from the file. Use the LoRA's .safetensors "
                            "release") from None
        raise LoraError(f"LoRA {path} is truncated or corrupt ({type(e).__name__}); download it again") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoraError(f"LoRA {path} is not a dict of tensors; it is not a LoRA file")
    return obj, {}


# ---------------------------------------------------------------------------------------------- the key tables
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_module(module: str, cfg: UNetConfig) -> str | None:
    """A UNet module's diffusers name → its SGM / LDM name (the original UNet's flat block numbering): level i of
    the encoder holds input_blocks 1 + i·n + j (n = layers_per_block + 1; j: the layer, the last one the
    downsampler), the mid block middle_block.0-2, and decoder level i (deepest first) output_blocks i·n + j, its
    upsampler after the transformer where the level has one. None for a name outside the UNet."""
    n = cfg.layers_per_block + 1
    top = len(cfg.block_out_channels) - 1
    if module in UNET_TOP:
        return UNET_TOP[module]
    rules = (
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda i, j: f"input_blocks.{1 + i * n + j}.0", True),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda i, j: f"input_blocks.{1 + i * n + j}.1", False),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.(conv)", lambda i: f"input_blocks.{(i + 1) * n}.0", {"conv": "op"}),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda j: f"middle_block.{2 * j}", True),
        (r"mid_block\.attentions\.0\.(.+)", lambda: "middle_block.1", False),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda i, j: f"output_blocks.{i * n + j}.0", True),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda i, j: f"output_blocks.{i * n + j}.1", False),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.(conv)",
         lambda i: f"output_blocks.{i * n + n - 1}.{2 if cfg.attention_levels[top - i] else 1}", False),
    )
    for pattern, block, rename in rules:
        m = re.fullmatch(pattern, module)
        if m:
            *numbers, rest = m.groups()
            if rename is True:
                rest = RESNET.get(rest, rest)
            elif isinstance(rename, dict):
                rest = rename[rest]
            return f"{block(*map(int, numbers))}.{rest}"
    return None


def weight_modules(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The modules of a state dict that have a weight (a LoRA can only change those)."""
    return [k[: -len(".weight")] for k in state_dict if k.endswith(".weight")]


def kohya_table(state_dict: dict[str, torch.Tensor], component: str, cfg: UNetConfig | None = None) -> dict[str, str]:
    """kohya's underscore name → the module, from the model's own keys: every module with its dots made
    underscores; for the UNet also its SGM name made so (`sgm_module`). A name two modules share maps to None."""
    table: dict[str, str | None] = {}

    def add(name: str, module: str) -> None:
        key = name.replace(".", "_")
        table[key] = module if table.get(key, module) == module else None

    for module in weight_modules(state_dict):
        add(module, module)
        if component == "unet" and cfg is not None:
            sgm = sgm_module(module, cfg)
            if sgm is not None:
                add(sgm, module)
    return table


# ------------------------------------------------------------------------------------------------ parsing keys
def split_key(key: str) -> tuple[str, str, str, str] | None:
    """A LoRA key → (component, naming, name, part): naming "kohya" (name with underscores) or "module" (a dotted
    module name), part "down", "up" or "alpha"; None for a key of neither layout."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, part = key[len(prefix):].partition(".")
            return (component, "kohya", name, KOHYA_PARTS[part]) if part in KOHYA_PARTS else None
    component, _, rest = key.partition(".")
    if component not in ("unet", *TEXT_ENCODERS):
        return None
    m = PROCESSOR_KEY.fullmatch(rest)
    if m:
        attention, proj, part = m.groups()
        return component, "module", f"{attention}.{'to_out.0' if proj == 'to_out' else proj}", part
    for suffix, part in MODULE_PARTS.items():
        if rest.endswith("." + suffix):
            return component, "module", rest[: -len(suffix) - 1], part
    return None


def metadata_alphas(metadata: dict) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` header → {component: PEFT LoraConfig fields} (empty without one)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field_name = key.partition(".")
        out.setdefault(component, {})[field_name] = value
    return out


def peft_alpha(config: dict, module: str, rank: int) -> float | None:
    """α of one module from a PEFT LoraConfig (its alpha_pattern, else lora_alpha); rsLoRA's α/√r is returned as the
    α that gives the same α/r. None without a config."""
    if not config or "lora_alpha" not in config:
        return None
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            alpha = float(value)
            break
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def lora_tensors(sd: dict[str, torch.Tensor], where: str) -> dict[tuple[str, str, str], dict]:
    """Group a LoRA's keys by layer: (component, naming, name) → {"down", "up", "alpha", "keys"}. LoraError for
    another adapter kind, for keys of neither layout, and for a layer that lacks its down or up matrix."""
    for pattern, kind in OTHER_ADAPTERS.items():
        found = [k for k in sd if re.search(pattern, k)]
        if found:
            raise LoraError(f"LoRA {where} is a {kind} adapter (keys like {found[0]}), not a LoRA; t2vz merges plain "
                            "LoRAs (down/up matrices) only")
    groups: dict[tuple[str, str, str], dict] = {}
    unknown = []
    for key, tensor in sd.items():
        parsed = split_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        component, naming, name, part = parsed
        group = groups.setdefault((component, naming, name), {"keys": []})
        group[part] = tensor
        group["keys"].append(key)
    if unknown:
        raise LoraError(f"LoRA {where} has {len(unknown)} keys of no LoRA layout t2vz reads (kohya lora_unet_*/"
                        f"lora_te*_*, diffusers unet.*/text_encoder*.* lora_A/lora_B): {key_list(unknown)}")
    if not groups:
        raise LoraError(f"LoRA {where} holds no tensors")
    for (component, naming, name), group in groups.items():
        if "down" not in group or "up" not in group:
            raise LoraError(f"LoRA {where} has {group['keys'][0]} without its "
                            f"{'up' if 'down' in group else 'down'} matrix; the file is incomplete")
    return groups


def key_list(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f" ... ({len(keys)} in all)" if len(keys) > SHOWN else "")


# --------------------------------------------------------------------------------------------------- families
def family_of(state_dicts: dict, cfg: UNetConfig) -> str:
    """"sdxl" for a model with a second text encoder or the text_time added embedding, else "sd15"."""
    return SDXL if "text_encoder_2" in state_dicts or cfg.addition_embed_type == "text_time" else SD15


SGM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_")


def lora_families(groups: dict[tuple[str, str, str], dict]) -> set[str]:
    """The families a LoRA's keys point to: SDXL by a second text encoder (lora_te1_/lora_te2_, text_encoder_2.),
    SGM-named UNet layers, the added embedding, or a 2048-wide cross-attention context; SD 1.5 by kohya's single
    `lora_te_` or a 768-wide context. Empty where the keys say neither (a toy-sized LoRA)."""
    found = set()
    for (component, naming, name), group in groups.items():
        if component == "text_encoder_2" or any(k.startswith("lora_te1_") for k in group["keys"]):
            found.add(SDXL)
        if any(k.startswith("lora_te_") for k in group["keys"]):
            found.add(SD15)
        if component == "unet" and ((naming == "kohya" and name.startswith(SGM_BLOCKS)) or "add_embedding" in name
                                    or "label_emb" in name):
            found.add(SDXL)
        if component == "unet" and re.search(r"attn2[._]to_[kv]$", name):
            width = group["down"].flatten(1).shape[1]
            found |= {SDXL} if width == 2048 else {SD15} if width == 768 else set()
    return found


def check_family(groups, state_dicts: dict, cfg: UNetConfig, where: str) -> None:
    model = family_of(state_dicts, cfg)
    found = lora_families(groups)
    if found and model not in found:
        other = found.pop()
        raise LoraError(f"LoRA {where} was made for {FAMILY_NAMES[other]}, the model is {FAMILY_NAMES[model]}; use a "
                        f"LoRA trained on an {FAMILY_NAMES[model]} model")


# ------------------------------------------------------------------------------------------------------ merging
def resolve_layers(groups, state_dicts: dict, cfg: UNetConfig, metadata: dict, where: str) -> list[LoraLayer]:
    """Each layer's module in the model (LoraError listing a few keys that match none), α from the file."""
    tables: dict[str, dict] = {}
    peft = metadata_alphas(metadata)
    layers, unmatched = [], []
    for (component, naming, name), group in groups.items():
        sd = state_dicts.get(component)
        module = None
        if sd is not None and naming == "kohya":
            if component not in tables:
                tables[component] = kohya_table(sd, component, cfg)
            module = tables[component].get(name)
        elif sd is not None:
            candidates = (name, "text_model." + name) if component in TEXT_ENCODERS else (name,)
            module = next((c for c in candidates if c + ".weight" in sd), None)
        if module is None:
            unmatched += group["keys"][:1]
            continue
        alpha = group.get("alpha")
        rank = group["down"].shape[0]
        alpha = float(alpha) if alpha is not None else peft_alpha(peft.get(component, {}), name, rank)
        layers.append(LoraLayer(component, module, group["down"], group["up"], alpha, tuple(group["keys"])))
    if unmatched:
        missing = sorted({c for c, _, _ in groups} - set(state_dicts))
        hint = f" (the model has no {', '.join(missing)})" if missing else ""
        raise LoraError(f"LoRA {where} does not match the model{hint}: {len(unmatched)} of its layers name no module "
                        f"of it, e.g. {key_list(sorted(unmatched))}; use a LoRA made for this model's architecture")
    return layers


def check_fits(layer: LoraLayer, weight_shape: torch.Size, where: str) -> None:
    """The factors fit the weight: a linear (out, in) or a 1×1 convolution (out, in, 1, 1) takes linear or 1×1
    factors, a k×k convolution a k×k down and a 1×1 up (LoCon)."""
    down, up = layer.down, layer.up
    conv = len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1)
    fits = (len(weight_shape) >= 2 and up.shape[0] == weight_shape[0] and up.flatten(1).shape[1] == down.shape[0]
            and (tuple(down.shape[1:]) == tuple(weight_shape[1:]) if conv
                 else down.flatten(1).shape[1] == weight_shape[1]))
    if not fits:
        raise LoraError(f"LoRA {where}: {layer.keys[0]} (down {tuple(down.shape)}, up {tuple(up.shape)}) does not fit "
                        f"the model's {layer.component} {layer.module} of shape {tuple(weight_shape)}; the LoRA was "
                        "made for another model")


def layer_delta(layer: LoraLayer, weight_shape: torch.Size, scale: float) -> torch.Tensor:
    """s · (α / r) · up @ down in float32, shaped as the weight (`check_fits` said it fits)."""
    rank = layer.down.shape[0]
    alpha = rank if layer.alpha is None else layer.alpha
    product = layer.up.float().flatten(1) @ layer.down.float().flatten(1)
    return (scale * alpha / rank) * product.reshape(weight_shape)


def merge_lora_tensors(state_dicts: dict[str, dict[str, torch.Tensor]], cfg: UNetConfig,
                       lora: dict[str, torch.Tensor], scale: float, metadata: dict | None = None,
                       where: str = "state dict") -> dict[str, dict[str, torch.Tensor]]:
    """`state_dicts` with one LoRA's layers merged at `scale` (new dicts; the touched weights float32, the others as
    they were). Refuses, before changing anything, a LoRA of the other family, one whose layers name modules the
    model lacks, and one whose shapes do not fit."""
    groups = lora_tensors(lora, where)
    check_family(groups, state_dicts, cfg, where)
    layers = resolve_layers(groups, state_dicts, cfg, metadata or {}, where)
    for layer in layers:
        check_fits(layer, state_dicts[layer.component][layer.module + ".weight"].shape, where)
    out = {name: dict(sd) for name, sd in state_dicts.items()}
    for layer in layers:  # one update in memory at a time
        key = layer.module + ".weight"
        weight = out[layer.component][key]
        out[layer.component][key] = weight.float() + layer_delta(layer, weight.shape, scale)
    return out


def merge_loras(state_dicts: dict[str, dict[str, torch.Tensor]], cfg: UNetConfig,
                loras: list[LoRA]) -> dict[str, dict[str, torch.Tensor]]:
    """`state_dicts` with every LoRA file merged, in order, each at its scale (their updates add)."""
    for lora in loras:
        tensors, metadata = read_lora_file(lora.file)
        state_dicts = merge_lora_tensors(state_dicts, cfg, tensors, lora.scale, metadata, str(lora.file))
    return state_dicts

"""The t2vz model folder: what `weights_convert` writes and `t2vz.load` reads.

Layout (every state dict uses the diffusers SD 1.5 key names, which are t2vz's attribute names)::

    MODEL/
      t2vz_model.json          format tag, the three model configs, where the weights came from; optionally
                               "sample_size" and "method" (the model's own λ, t0, t1: `method_defaults`)
      unet.safetensors
      vae.safetensors
      text_encoder.safetensors CLIP text transformer, keys as CLIP checkpoints store them (text_model.*)
      tokenizer/vocab.json     CLIP BPE vocabulary (49408 tokens) and merges
      tokenizer/merges.txt
      tokenizer/tokenizer_config.json

"family" in `t2vz_model.json` says which model it is: "sd15" (SD 1.x; the default when absent, so folders written
before SDXL still load) or "sdxl". An SDXL folder (Podell et al. 2023) also has::

      text_encoder_2.safetensors  OpenCLIP ViT-bigG as CLIPTextModelWithProjection stores it (text_model.*,
                                  text_projection.weight); its CLIPTextConfig kwargs (with projection_dim) are the
                                  "text_encoder_2" entry
      tokenizer_2/                the same vocabulary and merges; its tokenizer_config.json pads with "!"

and "sample_size": 1024; its UNet config has SDXL's fields (`UNetConfig`) and its VAE config scaling_factor 0.13025.

A ControlNet folder (`python -m weights_convert` on a ControlNet checkpoint; `t2vz.load_controlnet`) holds
`t2vz_model.json` (format "t2vz-controlnet", a "controlnet" config) and `controlnet.safetensors` (diffusers'
ControlNetModel keys).

A folder is written into a temporary sibling and renamed into place, so a crash never leaves a half-written model.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT = "t2vz-model"
CONTROLNET_FORMAT = "t2vz-controlnet"  # a ControlNet folder: t2vz_model.json + controlnet.safetensors
CONTROLNET = "controlnet"
FORMAT_VERSION = 1
CONFIG_FILE = "t2vz_model.json"
COMPONENTS = ("unet", "vae", "text_encoder")  # an SD 1.x folder's weights
SD15, SDXL = "sd15", "sdxl"
FAMILY_COMPONENTS = {SD15: COMPONENTS, SDXL: (*COMPONENTS, "text_encoder_2")}
FAMILY_TOKENIZERS = {SD15: ("tokenizer",), SDXL: ("tokenizer", "tokenizer_2")}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


SHIPPED_MODELS = ("toyworld",)  # model folders inside the package (t2vz/data/models/NAME), loadable by name

# The paper's motion settings (Sec. 4.1: λ = 12 along δ = (1, 1), t0 = 44, t1 = 47 of 50 DDIM steps). A model folder
# may set its own in a "method" entry of t2vz_model.json (the toy model: warped late, at the step it follows a warp
# best); `method_defaults` merges the two, and the pipeline and `python -m t2vz` use them wherever no value is given.
PAPER_METHOD = {"motion_strength": 12.0, "t0": 44, "t1": 47}


def shipped_model_dir(name: str) -> Path:
    """The folder of a model that ships with t2vz (`SHIPPED_MODELS`)."""
    from importlib import resources

    return Path(str(resources.files("t2vz") / "data" / "models" / name))


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A model argument → its folder: an existing folder as it is, else a shipped model's name (`toyworld`)."""
    if not Path(model).is_dir() and str(model) in SHIPPED_MODELS:
        return shipped_model_dir(str(model))
    return Path(model)


class ModelFolderError(ValueError):
    """A model folder is missing, incomplete or not a t2vz model folder; the message says what to do."""


def model_family(meta: dict) -> str:
    """The "family" entry of a model folder's config: "sd15" when absent; ModelFolderError when unknown."""
    family = meta.get("family", SD15)
    if family not in FAMILY_COMPONENTS:
        raise ModelFolderError(f"{CONFIG_FILE} has family {family!r}; this t2vz reads {', '.join(FAMILY_COMPONENTS)}. "
                               "Re-run the conversion")
    return family


def write_model_folder(
    out_dir: str | os.PathLike,
    state_dicts: dict[str, dict[str, torch.Tensor]],
    config: dict,
    tokenizer_dir: str | os.PathLike,
    overwrite: bool = False,
    tokenizer_2_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a model folder atomically: into a temporary sibling first, then one rename.

    state_dicts: {"unet": ..., "vae": ..., "text_encoder": ...} (SDXL: and "text_encoder_2"); config: {"unet":
    {...}, "vae": {...}, "text_encoder": {...}, optionally "family" and free-form entries such as "source"};
    tokenizer_dir (SDXL: and tokenizer_2_dir) holds TOKENIZER_FILES.
    """
    family = model_family(config)
    missing = [c for c in FAMILY_COMPONENTS[family] if c not in state_dicts or c not in config]
    if missing:
        raise ModelFolderError(f"cannot write a {family} model folder without {missing}")
    tokenizers = {"tokenizer": tokenizer_dir, "tokenizer_2": tokenizer_2_dir}
    if any(tokenizers[t] is None for t in FAMILY_TOKENIZERS[family]):
        raise ModelFolderError(f"cannot write a {family} model folder without {FAMILY_TOKENIZERS[family]}")

    def fill(tmp: Path) -> None:
        for name in FAMILY_COMPONENTS[family]:
            save_weights(tmp, name, state_dicts[name])
        for tok in FAMILY_TOKENIZERS[family]:
            (tmp / tok).mkdir()
            for fname in TOKENIZER_FILES:
                src = Path(tokenizers[tok]) / fname
                if not src.is_file():
                    raise ModelFolderError(f"tokenizer folder {tokenizers[tok]} has no {fname}")
                shutil.copyfile(src, tmp / tok / fname)
        write_meta(tmp, FORMAT, config)

    return write_atomically(out_dir, fill, overwrite)


def write_controlnet_folder(
    out_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict, overwrite: bool = False
) -> Path:
    """Write a ControlNet folder atomically: `t2vz_model.json` (format CONTROLNET_FORMAT, a "controlnet" config
    dict and free-form entries such as "source") and `controlnet.safetensors` (diffusers' ControlNetModel keys)."""
    if CONTROLNET not in config:
        raise ModelFolderError(f"cannot write a ControlNet folder without a {CONTROLNET!r} config")

    def fill(tmp: Path) -> None:
        save_weights(tmp, CONTROLNET, state_dict)
        write_meta(tmp, CONTROLNET_FORMAT, config)

    return write_atomically(out_dir, fill, overwrite)


def save_weights(folder: Path, name: str, state_dict: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"format": "pt"})


def write_meta(folder: Path, fmt: str, config: dict) -> None:
    meta = {"format": fmt, "format_version": FORMAT_VERSION, **config}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def write_atomically(out_dir: str | os.PathLike, fill, overwrite: bool = False) -> Path:
    """`fill(tmp)` writes the folder's files into a temporary sibling of `out_dir`, which one rename puts in place
    (replacing `out_dir` only with `overwrite`); on any error the temporary folder goes and `out_dir` is untouched."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ModelFolderError(f"output folder {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        fill(tmp)
        apply_umask(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def apply_umask(folder: Path) -> None:
    """mkdtemp makes 0700 folders; give the model folder the permissions a plain mkdir/open would have."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def read_meta(path: str | os.PathLike, fmt: str = FORMAT) -> dict:
    """Read and check `t2vz_model.json` of a folder of format `fmt` (FORMAT: a model, CONTROLNET_FORMAT: a
    ControlNet); a folder of the other format gets an error saying which it is and what loads it."""
    folder = Path(path)
    if folder.is_file():
        raise ModelFolderError(file_instead_of_folder(folder))
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder {folder} does not exist; convert a checkpoint first "
            f"(python -m weights_convert CHECKPOINT {folder}), or use a model that ships with t2vz: "
            f"{', '.join(SHIPPED_MODELS)}"
        )
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        hint = ""
        if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
            hint = " It looks like a diffusers folder: convert it with python -m weights_convert first."
        raise ModelFolderError(f"{folder} is not a t2vz {'ControlNet' if fmt == CONTROLNET_FORMAT else 'model'} "
                               f"folder (no {CONFIG_FILE}).{hint}")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{cfg_path} is not valid JSON ({e}); re-run the conversion") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found == CONTROLNET_FORMAT and fmt == FORMAT:
        raise ModelFolderError(f"{folder} is a t2vz ControlNet folder, not a Stable Diffusion model folder; load it "
                               "with t2vz.load_controlnet, and the SD 1.5 model it controls with t2vz.load")
    if found == FORMAT and fmt == CONTROLNET_FORMAT:
        raise ModelFolderError(f"{folder} is a t2vz Stable Diffusion model folder, not a ControlNet folder; load it "
                               "with t2vz.load, and pass t2vz.load_controlnet a folder converted from a ControlNet "
                               "checkpoint")
    if found != fmt or meta.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(
            f"{cfg_path} has format {found!r} version {meta.get('format_version')!r}; "
            f"this t2vz reads {fmt!r} version {FORMAT_VERSION}. Re-run the conversion."
        )
    for name in (FAMILY_COMPONENTS[model_family(meta)] if fmt == FORMAT else (CONTROLNET,)):
        if name not in meta:
            raise ModelFolderError(f"{cfg_path} has no {name!r} entry; re-run the conversion")
    return meta


def is_lora_key(key: str) -> bool:
    """A LoRA's tensor name: kohya's `lora_unet_*`/`lora_te_*`, `*.lora_down.*`, or diffusers/PEFT's `*.lora_A.*`."""
    return key.startswith("lora_") or ".lora_down." in key or ".lora_A." in key


def file_instead_of_folder(file: Path) -> str:
    """What to tell a user who passed a file where a model folder goes: a LoRA cannot be a model; a checkpoint
    must be converted first."""
    keys: list[str] = []
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError):
        pass  # not a .safetensors file: no keys to look at
    lora = [k for k in keys if is_lora_key(k)]
    if lora:
        return (f"{file} is a file, a LoRA (keys like {lora[0]}), not a t2vz model "
                "folder: a LoRA adds to a base model and is not one; convert the base model with "
                "python -m weights_convert CHECKPOINT FOLDER and pass model=FOLDER")
    return (f"{file} is a file, not a t2vz model folder: convert it first with python -m weights_convert {file} "
            "FOLDER, then pass model=FOLDER")


def read_model_config(path: str | os.PathLike) -> dict:
    """Read and check `t2vz_model.json` of a model folder."""
    return read_meta(path, FORMAT)


def method_defaults(meta: dict) -> dict:
    """λ, t0 and t1 for a model folder's `t2vz_model.json` contents: its "method" entry over `PAPER_METHOD`.
    ModelFolderError on an unknown key or a bad value (λ a finite number, 0 <= t0 <= t1 integers)."""
    own = meta.get("method", {})
    if not isinstance(own, dict) or set(own) - set(PAPER_METHOD):
        raise ModelFolderError(f"the 'method' entry of {CONFIG_FILE}, {own!r}, must be an object with keys among "
                               f"{', '.join(PAPER_METHOD)}")
    out = {**PAPER_METHOD, **own}
    lam, t0, t1 = out["motion_strength"], out["t0"], out["t1"]
    ok_lam = isinstance(lam, (int, float)) and not isinstance(lam, bool) and math.isfinite(lam)
    ok_t = all(isinstance(t, int) and not isinstance(t, bool) for t in (t0, t1)) and 0 <= t0 <= t1
    if not (ok_lam and ok_t):
        raise ModelFolderError(f"the 'method' entry of {CONFIG_FILE} gives motion_strength={lam!r}, t0={t0!r}, "
                               f"t1={t1!r}; it needs a finite motion_strength and integers 0 <= t0 <= t1")
    return {"motion_strength": float(lam), "t0": t0, "t1": t1}


def model_method_defaults(model: str | os.PathLike) -> dict:
    """`method_defaults` of a model argument (a folder or a shipped name), read without loading any weights; the
    paper's (`PAPER_METHOD`) when the folder cannot be read or its entry is bad: loading it then says why."""
    try:
        return method_defaults(read_model_config(resolve_model_path(model)))
    except ModelFolderError:
        return dict(PAPER_METHOD)


def read_controlnet_config(path: str | os.PathLike) -> dict:
    """Read and check `t2vz_model.json` of a ControlNet folder."""
    return read_meta(path, CONTROLNET_FORMAT)


def read_state_dict(path: str | os.PathLike, component: str) -> dict[str, torch.Tensor]:
    """Read one component's weights from a model folder, with a clear error for a missing or corrupt file."""
    file = Path(path) / f"{component}.safetensors"
    if not file.is_file():
        raise ModelFolderError(f"{file} is missing; re-run the conversion")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"{file} is truncated or corrupt ({e}); re-run the conversion") from None

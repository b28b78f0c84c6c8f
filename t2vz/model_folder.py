"""The t2vz model folder: what `weights_convert` writes and `t2vz.load` reads.

Layout (every state dict uses the diffusers SD 1.5 key names, which are t2vz's attribute names)::

    MODEL/
      t2vz_model.json          format tag, the three model configs, where the weights came from
      unet.safetensors
      vae.safetensors
      text_encoder.safetensors CLIP text transformer, keys as CLIP checkpoints store them (text_model.*)
      tokenizer/vocab.json     CLIP BPE vocabulary (49408 tokens) and merges
      tokenizer/merges.txt
      tokenizer/tokenizer_config.json

A folder is written into a temporary sibling and renamed into place, so a crash never leaves a half-written model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "t2vz-model"
FORMAT_VERSION = 1
CONFIG_FILE = "t2vz_model.json"
COMPONENTS = ("unet", "vae", "text_encoder")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


SHIPPED_MODELS = ("toyworld",)  # model folders inside the package (t2vz/data/models/NAME), loadable by name


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


def write_model_folder(
    out_dir: str | os.PathLike,
    state_dicts: dict[str, dict[str, torch.Tensor]],
    config: dict,
    tokenizer_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write a model folder atomically: into a temporary sibling first, then one rename.

    state_dicts: {"unet": ..., "vae": ..., "text_encoder": ...}; config: {"unet": {...}, "vae": {...},
    "text_encoder": {...}, plus free-form entries such as "source"}; tokenizer_dir holds TOKENIZER_FILES.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ModelFolderError(f"output folder {out} already exists; pass --overwrite to replace it")
    missing = [c for c in COMPONENTS if c not in state_dicts or c not in config]
    if missing:
        raise ModelFolderError(f"cannot write a model folder without {missing}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        for name in COMPONENTS:
            tensors = {k: v.detach().contiguous().cpu() for k, v in state_dicts[name].items()}
            save_file(tensors, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
        (tmp / "tokenizer").mkdir()
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if not src.is_file():
                raise ModelFolderError(f"tokenizer folder {tokenizer_dir} has no {fname}")
            shutil.copyfile(src, tmp / "tokenizer" / fname)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
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


def read_model_config(path: str | os.PathLike) -> dict:
    """Read and check `t2vz_model.json` of a model folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder {folder} does not exist; convert a checkpoint first "
            f"(python -m weights_convert CHECKPOINT {folder}), or use a model that ships with t2vz: "
            f"{', '.join(SHIPPED_MODELS)}"
        )
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        hint = ""
        if (folder / "model_index.json").is_file():
            hint = " It looks like a diffusers folder: convert it with python -m weights_convert first."
        raise ModelFolderError(f"{folder} is not a t2vz model folder (no {CONFIG_FILE}).{hint}")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{cfg_path} is not valid JSON ({e}); re-run the conversion") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(
            f"{cfg_path} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"this t2vz reads {FORMAT!r} version {FORMAT_VERSION}. Re-run the conversion."
        )
    for name in COMPONENTS:
        if name not in meta:
            raise ModelFolderError(f"{cfg_path} has no {name!r} entry; re-run the conversion")
    return meta


def read_state_dict(path: str | os.PathLike, component: str) -> dict[str, torch.Tensor]:
    """Read one component's weights from a model folder, with a clear error for a missing or corrupt file."""
    file = Path(path) / f"{component}.safetensors"
    if not file.is_file():
        raise ModelFolderError(f"{file} is missing; re-run the conversion")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"{file} is truncated or corrupt ({e}); re-run the conversion") from None

"""`convert`: an SD 1.x or SDXL base checkpoint (single file or diffusers folder) → a t2vz model folder, or an SD
1.x ControlNet checkpoint → a t2vz ControlNet folder; written atomically."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from t2vz.sd.model_folder import TOKENIZER_FILES, write_controlnet_folder, write_model_folder
from t2vz.sd.text_encoder import SDXL_TOKENIZER_2_CONFIG, shipped_tokenizer_dir

from weights_convert.checkpoint_io import ConversionError, read_weights
from weights_convert.clip_vocab import TOKENIZER_CONFIG
from weights_convert.controlnet import (
    controlnet_config_dict, is_controlnet_file, is_controlnet_folder, read_controlnet_file, read_controlnet_folder,
)
from weights_convert.diffusers_folder import is_diffusers_folder, read_diffusers_folder
from weights_convert.ldm import read_single_file
from weights_convert.target import Source, config_dicts, sdxl_config_dicts

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Report:
    """What a conversion found and wrote; `str(report)` is the summary the CLI prints."""

    source: Path
    out: Path
    layout: str
    source_dtype: str
    dtype: str
    ema: bool
    variant: str
    parameters: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        millions = ", ".join(f"{name} {n / 1e6:.1f}M" for name, n in self.parameters.items())
        lines = [
            f"converted {self.source}",
            f"  found    {self.layout} layout, {self.source_dtype} weights, variant {self.variant}",
            *(f"  note     {n}" for n in self.notes),
            f"  wrote    {self.out} ({self.dtype}; parameters: {millions})",
        ]
        return "\n".join(lines)


def check_paths(src: Path, out: Path, overwrite: bool) -> None:
    if not src.exists():
        raise ConversionError(f"{src} does not exist; pass an SD 1.x or SDXL .safetensors/.ckpt file or a diffusers "
                              "folder")
    if out.exists() and not overwrite:
        raise ConversionError(f"output folder {out} already exists; pass --overwrite to replace it")
    s, o = src.resolve(), out.resolve()
    if s == o or o in s.parents:
        raise ConversionError(f"output folder {out} would replace the checkpoint {src}; choose another OUT")


def read_source(src: Path, prefer_ema: bool, allow_inpainting: bool) -> Source:
    """An SD 1.x or SDXL model or a ControlNet (recognised by its keys, or its folder's config.json), read and
    checked."""
    if src.is_file():
        weights = read_weights(src)
        if is_controlnet_file(weights):
            return read_controlnet_file(src, weights=weights)
        return read_single_file(src, prefer_ema=prefer_ema, allow_inpainting=allow_inpainting, weights=weights)
    if is_diffusers_folder(src):
        return read_diffusers_folder(src, allow_inpainting=allow_inpainting)
    if is_controlnet_folder(src):
        return read_controlnet_folder(src)
    raise ConversionError(
        f"{src} is neither a checkpoint file nor a diffusers folder (which has unet/, vae/ and text_encoder/, "
        "each with a config.json, or for a ControlNet config.json and diffusion_pytorch_model.safetensors)"
    )


@contextlib.contextmanager
def tokenizer_files(folder: Path, vocab_size: int, config: dict | None = None):
    """A folder with TOKENIZER_FILES: `folder` itself, or a temporary copy with SD's tokenizer_config.json added;
    with `config` (SDXL's second tokenizer), always a copy of the vocabulary with that tokenizer_config.json."""
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise ConversionError(f"tokenizer folder {folder} needs vocab.json and merges.txt (CLIP's BPE tokenizer)")
    try:
        tokens = len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{folder / 'vocab.json'} cannot be read ({e})") from None
    if tokens > vocab_size:
        raise ConversionError(f"{folder} has {tokens} tokens but the text encoder embeds {vocab_size}; "
                              "pass the tokenizer that belongs to this model with --tokenizer")
    if config is None and (folder / "tokenizer_config.json").is_file():
        yield folder
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in TOKENIZER_FILES[:2]:
            shutil.copyfile(folder / name, Path(tmp) / name)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config or TOKENIZER_CONFIG, indent=2) + "\n")
        yield Path(tmp)


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
    allow_inpainting: bool = False,
    prefer_ema: bool = True,
) -> Report:
    """Convert `src` into the t2vz model folder `out` (a ControlNet folder when `src` is a ControlNet checkpoint,
    recognised by its keys or its config.json); raises ConversionError with what to do when it cannot.

    tokenizer: a folder with CLIP's vocab.json and merges.txt; default the checkpoint's own (diffusers folder) or
    the one that ships with t2vz. An SDXL model's second tokenizer is its folder's tokenizer_2/, else the same
    vocabulary padding with "!" (`SDXL_TOKENIZER_2_CONFIG`). prefer_ema: take a single file's EMA UNet weights
    when it has them.
    """
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    check_paths(src, out, overwrite)
    if tokenizer and not all((Path(tokenizer) / f).is_file() for f in ("vocab.json", "merges.txt")):
        raise ConversionError(f"--tokenizer {tokenizer} needs vocab.json and merges.txt (CLIP's BPE tokenizer)")
    source = read_source(src, prefer_ema, allow_inpainting)
    source_dtype = source.dtype
    to = DTYPES[dtype]
    state_dicts = {c: {k: t.to(to) if t.is_floating_point() else t for k, t in sd.items()}
                   for c, sd in source.state_dicts.items()}
    source.state_dicts = None  # the file's tensors can go as soon as each is cast
    controlnet = "controlnet" in source.configs  # a ControlNet folder: no VAE, text encoder or tokenizer
    sdxl = "text_encoder_2" in source.configs
    if controlnet:
        config = controlnet_config_dict(source.configs["controlnet"])
    elif sdxl:
        config = sdxl_config_dicts(*(source.configs[c] for c in ("unet", "vae", "text_encoder", "text_encoder_2")))
    else:
        config = config_dicts(source.configs["unet"], source.configs["vae"], source.configs["text_encoder"])
    config["source"] = {"path": str(src.resolve()), "layout": source.layout, "ema": source.ema, "dtype": source_dtype}
    config["variant"] = source.variant
    config["dtype"] = str(to).removeprefix("torch.")
    notes = list(source.notes)
    if controlnet:
        write_controlnet_folder(out, state_dicts["controlnet"], config, overwrite=overwrite)
        notes.append("wrote a ControlNet folder: load it with t2vz.load_controlnet")
        if tokenizer:
            notes.append(f"--tokenizer {tokenizer} ignored: a ControlNet has no text encoder")
    else:
        tok = Path(tokenizer) if tokenizer else source.tokenizer_dir or shipped_tokenizer_dir()
        # SDXL's second tokenizer: the folder's own tokenizer_2/ as it is, else the vocabulary padding with "!"
        tok_2 = Path(source.tokenizer_2_dir) if sdxl and source.tokenizer_2_dir and not tokenizer else tok
        config_2 = None if tok_2 != tok and (tok_2 / "tokenizer_config.json").is_file() else SDXL_TOKENIZER_2_CONFIG
        with contextlib.ExitStack() as stack:
            tok_dir = stack.enter_context(tokenizer_files(Path(tok), source.configs["text_encoder"]["vocab_size"]))
            tok_2_dir = None
            if sdxl:
                vocab_2 = source.configs["text_encoder_2"]["vocab_size"]
                tok_2_dir = stack.enter_context(tokenizer_files(tok_2, vocab_2, config_2))
            write_model_folder(out, state_dicts, config, tok_dir, overwrite=overwrite, tokenizer_2_dir=tok_2_dir)
        notes.append(f"tokenizer from {tok}")
        if sdxl:
            notes.append(f"tokenizer_2 from {tok_2}" + (' (padding with "!")' if config_2 else ""))
    return Report(src, out, source.layout, source_dtype, config["dtype"], source.ema, source.variant,
                  {c: sum(t.numel() for t in sd.values()) for c, sd in state_dicts.items()}, notes)

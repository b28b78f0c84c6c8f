"""Reading checkpoint files safely: safetensors, or PyTorch pickles restricted to plain tensors.

Every failure is a `ConversionError` that names the file, what was found, and what to do. Pickles are read with
`torch.load(weights_only=True)`: a checkpoint that needs Python objects to load is refused, never executed.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message says what was found and what to do."""


def name_list(names, limit: int = 8) -> str:
    """'a, b, c ... and 12 more': a readable number of names from a long list."""
    names = list(names)
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def dtype_name(tensors) -> str:
    """The floating dtype of a set of tensors ('float16'), or 'mixed(float16, float32)'."""
    found = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()})
    if len(found) == 1:
        return found[0]
    return f"mixed({', '.join(found)})" if found else "none"


def sniff(path: Path) -> str:
    """What a weights file is by its first bytes: 'safetensors', 'zip' (torch.save), 'pickle' (legacy torch.save)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise ConversionError(f"{path} is empty (0 bytes); download it again")
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise ConversionError(
        f"{path} is neither a .safetensors file nor a PyTorch checkpoint (it starts with {head[:8]!r}); "
        "pass the model's .safetensors or .ckpt file, or a diffusers folder"
    )


def _refuse_pickle(path: Path, err: Exception) -> ConversionError:
    """Turn torch.load's errors into one clear sentence."""
    msg = str(err)
    found = (re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
             or re.search(r"unsupported GLOBAL ([\w.]+)", msg, re.IGNORECASE))
    if found or "Weights only load failed" in msg:
        what = f" ({found.group(1)})" if found else ""
        return ConversionError(
            f"{path} is a pickle holding Python objects that are not tensors{what}; it is refused because loading "
            "it would run code from the file. Use the model's .safetensors release, or re-save only its "
            "state_dict from a Python session you trust"
        )
    return ConversionError(
        f"{path} is truncated or corrupt ({type(err).__name__}: {msg.splitlines()[0][:200]}); download it again"
    )


class SafetensorsFile(Mapping):
    """The tensors of a .safetensors file, each read when first asked for: the weights a conversion leaves out
    (a file's live UNet when its EMA copy is taken) never occupy memory."""

    def __init__(self, path: Path):
        try:
            self._file = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise ConversionError(
                f"{path} is a truncated or corrupt .safetensors file ({e}); download it again"
            ) from None
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._key_set


def read_weights(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The tensors of one weights file, keys as stored; a top-level `state_dict` wrapper (Lightning's .ckpt) is
    unwrapped and its siblings (global_step, epoch, ...) ignored. Both kinds are read lazily (mmap)."""
    path = Path(path)
    kind = sniff(path)
    if kind == "safetensors":
        return SafetensorsFile(path)
    try:
        # mmap keeps a multi-GB .ckpt out of memory until its tensors are used; legacy pickles cannot be mapped.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise _refuse_pickle(path, e) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(
            f"{path} holds a {type(obj).__name__}, not a dict of weights; it is not a model checkpoint"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(
            f"{path} has entries that are not tensors: {name_list(bad)}; it is not a plain SD 1.x state dict"
        )
    return obj

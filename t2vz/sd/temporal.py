"""Tune-A-Video's inflated UNet (Wu et al., ICCV 2023, Sec. 4.1): the image UNet plus a temporal self-attention
layer in every transformer block, and the file that holds a one-shot tuning's weights (`method/tune_a_video.py`).

The temporal layer (their `Temp-Attn`), after the feed-forward of each `BasicTransformerBlock`, on the tokens
x ((b f), n, c) of b videos of f frames:

    x ← rearrange(x, (b f) n c → (b n) f c)          every spatial position becomes a sequence of its f frames
    x ← x + Attn_temp(LayerNorm_temp(x))             self-attention over the frames, softmax(Q Kᵀ/√d) V per head
    x ← rearrange(x, (b n) f c → (b f) n c)

with Q, K, V projections of their own (no positional encoding, as theirs). The layers are the block's attributes
`norm_temp` and `attn_temp`, the authors' module names, so their trainable-name matching ("attn_temp") and their
state-dict keys (`…transformer_blocks.0.attn_temp.to_q.weight`) carry over. Together with sparse-causal attention
in `attn1` (`CrossFrame(f, "first+previous")`, frame k attending to frames 1 and k−1) this is their
`UNet3DConditionModel`; its "3D" convolutions are 2D convolutions per frame, the image UNet's.

`attn_temp.to_out.0` starts at zero, weight AND bias. The authors zero the weight only (`nn.init.zeros_` on
`to_out[0].weight`); the bias keeps PyTorch's random init, so their untuned model adds a constant per channel after
every block and is not the image model. Zeroing both makes the untuned inflated UNet equal the image UNet with
cross_frame "first+previous", bit for bit (x + 0 = x); tuning moves the bias as it would theirs.

The frame count f comes from the `cross_frame` every block receives (`CrossFrame.num_frames`); without one, each
row is its own one-frame video (the layer then sees one token per sequence). Temporal attention needs every frame of
a video in the same UNet call, so chunked generation (`CrossFrame.anchor`, `method/chunks.py`) is refused, and so
is `CrossFrame.levels`: the levels it leaves out get no CrossFrame, hence no frame count.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from safetensors import SafetensorError, safe_open
from torch import nn

from .attention import Attention, BasicTransformerBlock
from .lora import file_sha256
from .model_folder import ModelFolderError

if TYPE_CHECKING:
    from .attention import CrossFrame
    from .unet import UNet

TEMPORAL_LAYERS = ("norm_temp", "attn_temp")  # the attributes `inflate` adds to every transformer block
TUNED_FORMAT = "t2vz-tune-a-video"            # the format tag of a tuned-weights file's metadata
TUNED_FORMAT_VERSION = "1"
TUNED_KEYS = ("format", "format_version", "base_model", "base_unet_sha256", "trainable", "num_frames", "prompt")


class TunedWeightsError(ModelFolderError):
    """A tuned-weights file is missing, corrupt, not Tune-A-Video weights, or of another base model."""


def frames_of(cross_frame: CrossFrame | None, rows: int) -> int:
    """f, the frames per video of a batch of `rows` rows: `cross_frame.num_frames`, 1 without a CrossFrame.
    ValueError for a chunk of a video (`anchor`): temporal attention needs all of a video's frames at once."""
    if cross_frame is None:
        return 1
    if cross_frame.anchor is not None:
        raise ValueError("temporal attention needs all frames of a video in one UNet call, so chunk_size cannot be "
                         "used with a Tune-A-Video model; leave chunk_size unset (None)")
    f = cross_frame.num_frames
    if rows % f:
        raise ValueError(f"batch of {rows} frames is not a whole number of videos of {f} frames")
    return f


def temporal_attention(block: BasicTransformerBlock, x: torch.Tensor, cross_frame: CrossFrame | None) -> torch.Tensor:
    """The temporal layer of `block` (module docstring): x ((b f), n, c) → ((b f), n, c), each spatial position's f
    frames attending to each other through `block.attn_temp` after `block.norm_temp`, plus the residual."""
    f, n = frames_of(cross_frame, x.shape[0]), x.shape[1]
    frames = rearrange(x, "(b f) n c -> (b n) f c", f=f)
    frames = frames + block.attn_temp(block.norm_temp(frames))
    return rearrange(frames, "(b n) f c -> (b f) n c", n=n)


def transformer_blocks(unet: nn.Module) -> list[BasicTransformerBlock]:
    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


def is_inflated(unet: nn.Module) -> bool:
    """Whether `unet` has Tune-A-Video's temporal layers (`inflate`)."""
    blocks = transformer_blocks(unet)
    return bool(blocks) and all(block.temporal is not None for block in blocks)


def refuse_levels(unet: nn.Module, args: tuple, kwargs: dict) -> None:
    """The inflated UNet's forward pre-hook: ValueError for a `cross_frame` with `levels` (module docstring)."""
    cross_frame = kwargs.get("cross_frame", args[3] if len(args) > 3 else None)
    if cross_frame is not None and cross_frame.levels is not None:
        raise ValueError(f"cross_frame_levels={list(cross_frame.levels)} cannot be used with a Tune-A-Video model: "
                         "its temporal attention needs the frame count at every level; leave cross_frame_levels "
                         "unset (None)")


def inflate(unet: UNet, seed: int = 0) -> UNet:
    """Add the temporal layers to every transformer block of `unet`, in place, on its device and in its dtype, and
    return it (the new parameters require grad where the block's do: not in a `t2vz.load`ed model); an inflated
    UNet is returned as it is. `attn_temp`'s projections in take PyTorch's default init
    from a generator seeded with `seed` (the global one is untouched); `attn_temp.to_out.0` is zero, weight and
    bias, and `norm_temp` is the identity LayerNorm (weight 1, bias 0), so the untuned UNet is the image UNet with
    cross_frame "first+previous"."""
    if is_inflated(unet):
        return unet
    blocks = transformer_blocks(unet)
    if not blocks:
        raise ValueError("this UNet has no transformer blocks to add temporal attention to")
    with torch.random.fork_rng(devices=[]):  # CPU init under `seed`, the caller's random stream untouched
        torch.manual_seed(seed)
        for block in blocks:
            weight = block.norm1.weight
            dim, heads = weight.shape[0], block.attn1.heads
            attn = Attention(dim, heads, dim // heads)
            nn.init.zeros_(attn.to_out[0].weight)
            nn.init.zeros_(attn.to_out[0].bias)
            for name, layer in (("norm_temp", nn.LayerNorm(dim)), ("attn_temp", attn)):  # as the block's own
                setattr(block, name, layer.to(device=weight.device, dtype=weight.dtype).requires_grad_(
                    weight.requires_grad))
            block.temporal = temporal_attention
    unet.register_forward_pre_hook(refuse_levels, with_kwargs=True)
    return unet


def temporal_keys(unet: nn.Module) -> list[str]:
    """The state-dict keys of the temporal layers of an inflated `unet` (every `norm_temp.*` and `attn_temp.*`)."""
    return [k for k in unet.state_dict() if any(f".{layer}." in k for layer in TEMPORAL_LAYERS)]


# ------------------------------------------------------------------------------------------ tuned-weights files
def base_unet_sha256(folder: str | os.PathLike) -> str:
    """The sha256 of a model folder's `unet.safetensors`: what a tuned-weights file names its base model by."""
    file = Path(folder) / "unet.safetensors"
    if not file.is_file():
        raise ModelFolderError(f"{file} is missing; re-run the conversion")
    return file_sha256(file)


def read_tuned(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A tuned-weights file (`method.tune_a_video.save_tuned`) → (its tensors, its metadata with `trainable` a list
    and `num_frames` an int). TunedWeightsError, one line, for a missing, corrupt or foreign file."""
    file = Path(file)
    if not file.is_file():
        raise TunedWeightsError(f"tuned weights {file} {'is a folder' if file.is_dir() else 'do not exist'}; pass "
                                "the .safetensors file experiments/tune_a_video.py wrote (tuned.safetensors)")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TunedWeightsError(f"tuned weights {file} are not a readable .safetensors file ({reason}); pass the "
                                "tuned.safetensors that experiments/tune_a_video.py wrote") from None
    if meta.get("format") != TUNED_FORMAT:
        raise TunedWeightsError(f"{file} is a .safetensors file but not Tune-A-Video weights written by t2vz (its "
                                f"format tag is {meta.get('format')!r}, not {TUNED_FORMAT!r}); write them with "
                                "experiments/tune_a_video.py or t2vz.method.tune_a_video.save_tuned")
    missing = [key for key in TUNED_KEYS if key not in meta]
    if meta.get("format_version") != TUNED_FORMAT_VERSION or missing:
        raise TunedWeightsError(f"{file} has format version {meta.get('format_version')!r} and lacks {missing}; "
                                f"this t2vz reads version {TUNED_FORMAT_VERSION}: tune again")
    try:
        meta["trainable"] = json.loads(meta["trainable"])
        meta["num_frames"] = int(meta["num_frames"])
    except ValueError:
        raise TunedWeightsError(f"{file} has unreadable metadata (trainable {meta['trainable']!r}, num_frames "
                                f"{meta['num_frames']!r}); tune again") from None
    return tensors, meta


def load_tuned(unet: UNet, file: str | os.PathLike, base_folder: str | os.PathLike) -> dict:
    """Inflate `unet` (the UNet of the model folder `base_folder`) and load a tuned-weights file into it, strictly:
    the file's base must be this folder's `unet.safetensors` (by sha256), every tensor must name a parameter of the
    inflated UNet with its shape, and every temporal layer must be in it. Returns the file's metadata."""
    tensors, meta = read_tuned(file)
    own = base_unet_sha256(base_folder)
    if meta["base_unet_sha256"] != own:
        raise TunedWeightsError(
            f"tuned weights {file} were tuned from base model {meta['base_model']} (unet.safetensors sha256 "
            f"{meta['base_unet_sha256'][:16]}…), not from {base_folder} (sha256 {own[:16]}…); load them with the "
            "model they were tuned from")
    inflate(unet)
    expected = unet.state_dict()
    unknown = sorted(k for k in tensors if k not in expected)
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in tensors.items()
             if k in expected and v.shape != expected[k].shape]
    missing = sorted(k for k in temporal_keys(unet) if k not in tensors)
    if unknown or wrong or missing:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for label, keys in (("unknown keys", unknown), ("wrong shape", wrong),
                                     ("missing temporal keys", missing)) if keys]
        raise TunedWeightsError(f"tuned weights {file} do not fit the model {base_folder}: " + "; ".join(parts))
    with torch.no_grad():
        unet.load_state_dict(tensors, strict=False)
    return meta

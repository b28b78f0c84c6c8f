"""Long videos by chunks: the frames are denoised a chunk at a time, frame 1 prepended to every later chunk so
that cross-frame attention (Eq. 8) always has the anchor frame, and each frame keeps its global id (its motion,
its noise). With η = 0 and cross_frame "first" or "off" a frame depends on frame 1 and itself only, so chunked
generation equals unchunked generation (docs/method.md, "Long videos"). The one loop the three pipelines share.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def frame_chunks(f: int, chunk_size: int | None) -> list[list[int]]:
    """Frame ids per denoising chunk: all at once, or [0] + up to chunk_size − 1 new frames per chunk."""
    if chunk_size is None or chunk_size >= f:
        return [list(range(f))]
    new = list(range(1, f))
    return [list(range(chunk_size))] + [
        [0] + new[i : i + chunk_size - 1] for i in range(chunk_size - 1, len(new), chunk_size - 1)
    ]


def check_chunking(chunk_size: int | None, cross_frame: str, num_frames: int) -> None:
    """Chunks need chunk_size ≥ 2 (frame 1 plus new frames), and a cross-frame mode in which a frame depends on
    frame 1 and itself only."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 2:
        raise ValueError(f"chunk_size={chunk_size} must be an integer >= 2 (frame 1 plus new frames)")
    if cross_frame == "first+previous" and chunk_size < num_frames:
        raise ValueError("chunked generation needs cross_frame 'first' or 'off': with 'first+previous' every frame "
                         "depends on the one before, across chunk borders")


def generate_in_chunks(f: int, chunk_size: int | None,
                       generate: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """`generate(ids)` → frames (b, len(ids), H, W, 3) of those frame ids, for each chunk of `frame_chunks`;
    frame 1, repeated at the head of every later chunk, is kept once. Returns (b, f, H, W, 3)."""
    out = []
    for i, ids in enumerate(frame_chunks(f, chunk_size)):
        frames = generate(ids)
        out.append(frames if i == 0 else frames[:, 1:])
    return torch.cat(out, dim=1)

"""Long videos by chunks: at every DDIM step the UNet sees the video's frames a chunk at a time, so its memory is
bounded by the chunk, not by the video. Frame 1 runs in the first chunk only; its keys and values in every
cross-frame attention layer are recorded there and replayed to the later chunks (`sd.attention.AnchorKeys`), so
each frame attends to the same K¹, V¹ as in one call over all frames, and each keeps its global id (its motion,
its noise). With cross_frame "first" or "off" a frame depends on frame 1 and itself only, so chunked denoising
equals unchunked denoising (docs/method.md, "Long videos"). With feature caching (DeepCache) each chunk keeps its own
cache (`chunk_caches`). The one chunk loop the three pipelines share.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from einops import rearrange

from ..sd.attention import AnchorKeys, CrossFrame
from ..sd.deepcache import FeatureCache, check_branch, check_interval

# predict_chunk(x, t, ids, cross_frame) → ε: the noise prediction for the rows of frames `ids` of every video,
# ((g len(ids)), c, h, w), with the chunk's cross-frame attention (its frame count, and the AnchorKeys its frame 1
# keys and values are recorded into or replayed from)
ChunkPredictor = Callable[[torch.Tensor, torch.Tensor, list[int], CrossFrame | None], torch.Tensor]


def frame_chunks(f: int, chunk_size: int | None) -> list[list[int]]:
    """Frame ids per chunk, each at most chunk_size frames: all at once, or frame 1 and the frames after it in the
    first chunk, then the rest in order (the later chunks attend to frame 1 without holding it)."""
    if chunk_size is None or chunk_size >= f:
        return [list(range(f))]
    return [list(range(start, min(start + chunk_size, f))) for start in range(0, f, chunk_size)]


def frame_span(ids: list[int]) -> slice:
    """The slice of a chunk's frame ids (consecutive, as `frame_chunks` makes them): indexing by it takes a view,
    where indexing by the id list would copy the list to the tensor's device as an index at every step."""
    if list(ids) != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(f"frame ids {ids} are not consecutive")
    return slice(ids[0], ids[0] + len(ids))


def check_chunking(chunk_size: int | None, cross_frame: str, num_frames: int) -> None:
    """Chunks need chunk_size ≥ 2 (the first chunk holds frame 1 plus new frames), and a cross-frame mode in which a
    frame depends on frame 1 and itself only."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 2:
        raise ValueError(f"chunk_size={chunk_size} must be an integer >= 2 (frame 1 plus new frames)")
    if cross_frame == "first+previous" and chunk_size < num_frames:
        raise ValueError("chunked generation needs cross_frame 'first' or 'off': with 'first+previous' every frame "
                         "depends on the one before, across chunk borders")


def eps_by_chunks(predict_chunk: ChunkPredictor, cross_frame: CrossFrame | None, chunk_size: int | None
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The noise prediction `predict(x, t)` for all f = `cross_frame.num_frames` frames of every video (1 without
    cross-frame attention), x ((g f), c, h, w) video-major → ε of the same shape, from `predict_chunk` run on each
    chunk of `frame_chunks` in turn with that chunk's CrossFrame: the first chunk records frame 1's keys and
    values, the later ones replay them."""
    f = 1 if cross_frame is None else cross_frame.num_frames
    chunks = frame_chunks(f, chunk_size)
    spans = [frame_span(ids) for ids in chunks]  # views, not index lists copied to the device per chunk and step

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if len(chunks) == 1:
            return predict_chunk(x, t, chunks[0], cross_frame)
        frames = rearrange(x, "(g f) c h w -> g f c h w", f=f)
        eps = torch.empty_like(frames)
        anchor = AnchorKeys()
        for i, (ids, span) in enumerate(zip(chunks, spans)):
            anchor.replaying = i > 0
            rows = rearrange(frames[:, span], "g f c h w -> (g f) c h w")
            chunk = replace(cross_frame, num_frames=len(ids), anchor=anchor)
            eps[:, span] = rearrange(predict_chunk(rows, t, ids, chunk), "(g f) c h w -> g f c h w", f=len(ids))
        return rearrange(eps, "g f c h w -> (g f) c h w")
    return predict


def chunk_caches(cache: tuple[int, int] | None) -> Callable[[list[int]], FeatureCache | None]:
    """DeepCache's feature caches for one denoising loop, cache = (interval, branch): `caches(ids)` is the
    `FeatureCache` of the chunk of frames `ids`, made on its first call; None without caching.

    A cached feature belongs to the rows it was computed for, so each chunk keeps its own (keyed by its frame ids),
    and every chunk is called once per step: the chunks' counters stay in step, all of a step's chunks are full or
    cached passes together, and the later chunks replay frame 1's keys and values (`AnchorKeys`) in exactly the
    attention layers the first chunk ran. Each frame's cached feature is then the one an unchunked loop keeps for
    it, so chunked equals unchunked with caching too. Make one per loop: a new loop starts on a full pass.
    interval 1 keeps nothing: every call is the plain UNet."""
    if cache is None:
        return lambda ids: None
    interval, branch = cache
    check_interval(interval)
    check_branch(branch)
    if interval == 1:
        return lambda ids: None
    caches: dict[tuple[int, ...], FeatureCache] = {}

    def of_chunk(ids: list[int]) -> FeatureCache:
        key = tuple(ids)
        if key not in caches:
            caches[key] = FeatureCache(interval, branch)
        return caches[key]
    return of_chunk

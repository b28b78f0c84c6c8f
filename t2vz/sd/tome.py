"""Token Merging for Stable Diffusion (ToMe for SD; Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion")
on the transformer blocks of the SD 1.5 UNet.

Before a block's self-attention, r = ⌊n·ratio⌋ of its n tokens are merged into similar ones by bipartite soft
matching (ToMe, Bolya et al. 2023, "Token Merging: Your ViT but Faster"), with ToMe for SD's 2-D partition: one
destination per sy×sx cell of the token grid, chosen at random. Attention then runs on n − r tokens, and its output is
unmerged back to n (ToMe for SD's "unmerging": every merged token takes its destination's output), so the residual
stream, the convolutions and every sublayer left unmerged keep all n tokens. The matching is computed on the block's
input and reused for each merged sublayer (self-attention by default; cross-attention and the MLP optionally).

This is the algorithm of the authors' `tomesd` package (0.1.3) written anew, with its options, defaults and random
stream, so that a UNet given `TokenMerging` reproduces a diffusers UNet patched with `tomesd.apply_patch`
(tests/test_tome.py). Where it differs (it never fails where tomesd does) is said at the place.

Axis letters: b batch rows, n tokens, c channels, h w the token grid (n = h·w), k destinations (one per sy×sx cell),
s = n − k sources, r merged sources.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange

if TYPE_CHECKING:
    from .attention import AnchorKeys

MAX_DOWNSAMPLES = (1, 2, 4, 8)


@dataclass
class TokenMerging:
    """ToMe for SD's options, tomesd's names and defaults (`tomesd.apply_patch`).

      ratio           the fraction of a block's tokens merged away, r = ⌊n·ratio⌋, in [0, 1). At most the s sources
                      can merge, so anything above 1 − 1/(sx·sy) (0.75 for 2×2) merges all of them. 0 is the exact
                      path: the UNet runs no merging code at all.
      max_downsample  merge in the blocks whose token grid is downsampled at most this much from the latent (1, 2, 4
                      or 8): UNet level i is downsampled 2**i, so 1 is level 0 only (SD 1.5: 5 of its 16 transformer
                      blocks), 8 every level.
      sx, sy          the destination stride: one destination per sy×sx cell (they need not divide the grid; the
                      tokens past the last whole cell are all sources).
      use_rand        pick each cell's destination at random (one draw per block call), else its top-left token.
                      tomesd turns it off for a batch of odd size, where the two guidance branches of one image
                      cannot share the batch (and so its draw); so does this.
      merge_attn / merge_crossattn / merge_mlp   which sublayers run on the merged tokens (self-attention,
                      text cross-attention, feed-forward).
      device          the device the UNet runs on, where known when the merging is made
                      (`FastModes.token_merging(generator, device)`): the random stream is made for it (below).
                      None: the device of the first block call (a fork made there, inside a torch.compile'd UNet,
                      breaks that call's graph; with `device` the pipelines' loop makes it before the call).
      generator       the stream of the random destination choices. None: forked from torch's global RNG (that
                      of the device the UNet runs on; the CPU's for devices other than CUDA) at the first block
                      call that merges, and kept here, so later calls continue it: tomesd's `init_generator`,
                      whose fork lives as long as the patch. A supplied generator is copied (`merging.generator`
                      then reads the copy's current state; the caller's generator never advances). On a CUDA
                      `device` a generator of another device is replaced by a CUDA one seeded with its
                      `initial_seed()`: tomesd draws there from its fork of the CUDA RNG, which
                      torch.manual_seed(s) seeds with s, so a generator seeded with s gives tomesd's choices after
                      torch.manual_seed(s) on CUDA as on the CPU (on CUDA whatever was drawn from it since).

    The stream is kept as its state tensor (`RandomStream`) and drawn from through a custom op, so that a
    torch.compile'd UNet traces the draws into its graph: dynamo cannot take a `torch.Generator` into a graph, and
    `torch.randint(generator=…)` broke the graph inside every merging block, leaving dynamo to compile the blocks
    one by one until its recompile limit: 37 graphs over one toy-model generation (4 frames, 10 steps, merging at
    levels 1 and 2), where the UNet now makes 2, one per batch shape (tests/test_compile.py).
    """

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    device: torch.device | None = field(default=None, repr=False, compare=False)
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)  # a property, below
    _stream = None  # not a field: the RandomStream, set through `generator` or at the first draw

    def __post_init__(self):
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"ratio={ratio!r} must be in [0, 1): the fraction of each block's tokens merged away "
                             "(0 merges nothing)")
        for name in ("sx", "sy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1 (the destination stride)")
        if isinstance(self.max_downsample, bool) or self.max_downsample not in MAX_DOWNSAMPLES:
            raise ValueError(f"max_downsample={self.max_downsample!r} must be one of {MAX_DOWNSAMPLES} (merge where "
                             "the token grid is downsampled at most this much from the latent)")
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")

    def random_stream(self, device: torch.device) -> RandomStream:
        """The stream the destination choices are drawn from: the supplied generator's, or forked from the global
        RNG of `self.device` (else `device`) on first use."""
        if self._stream is None:
            self._stream = RandomStream(fork_global_rng(torch.device(self.device or device)))
        return self._stream

    def get_generator(self) -> torch.Generator | None:
        """`merging.generator`: a generator in the stream's current state (a copy: drawing from it does not
        advance the stream); None before a stream exists."""
        return None if self._stream is None else self._stream.generator()

    def set_generator(self, generator: torch.Generator | None) -> None:
        """`merging.generator = g`: the stream becomes a copy of g (a CUDA one seeded alike where `device` is CUDA
        and g is not, see the class); None: forked from the global RNG at first use."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator={generator!r} must be a torch.Generator or None")
        self._stream = None if generator is None else RandomStream(stream_generator(generator, self.device))

    def destination_choice(self, h: int, w: int, b: int, device: torch.device) -> torch.Tensor:
        """(h // sy, w // sx): the destination of each whole sy×sx cell, as the index i·sx + j of its row i, column j
        inside the cell. One draw of `random_stream` (shared by the b rows, so the guidance branches of an image get
        the same partition), or 0 (the top-left token) when use_rand is off or b is odd."""
        cells = (h // self.sy, w // self.sx)
        if not self.use_rand or b % 2:
            return torch.zeros(cells, dtype=torch.long, device=device)
        # tomesd's draw exactly (its shape, on the stream's device), so the two take the same numbers from one stream
        draw = self.random_stream(device).randint(self.sy * self.sx, (*cells, 1))
        return draw[..., 0].to(device)

    def plan(self, x: torch.Tensor, h: int, w: int, anchor: AnchorKeys | None = None,
             key: object | None = None) -> Matching | None:
        """The matching of one transformer-block call on its input x (b, n, c), n = h·w: None where nothing merges
        (r = 0, or a grid smaller than one cell, where tomesd would fail).

        Called once per block call that may merge, in forward order, so the draws come in tomesd's order. With an
        `anchor` of chunked generation (`AnchorKeys`), the first chunk records the block's destination choice under
        `key` and the later chunks replay it: every frame is matched on the partition an unchunked call would use,
        and the stream advances once per block and step, as unchunked.
        """
        b, n, _ = x.shape
        self.random_stream(x.device)  # fork now whether or not this call draws: tomesd forks at the first call
        r = int(n * self.ratio)
        if r <= 0 or h // self.sy == 0 or w // self.sx == 0:
            return None
        if anchor is not None and anchor.replaying:
            choice = anchor.destinations[key]
        else:
            choice = self.destination_choice(h, w, b, x.device)
            if anchor is not None:
                anchor.destinations[key] = choice
        src, dst = partition(h, w, self.sx, self.sy, choice)
        return bipartite_soft_matching(x, src, dst, r)


# `generator` is the stream's state seen as a torch.Generator: the dataclass's __init__ assigns it through this
# property, so TokenMerging(generator=g) keeps g's state in `_stream`
TokenMerging.generator = property(TokenMerging.get_generator, TokenMerging.set_generator)


@torch.library.custom_op("t2vz::randint_from_state", mutates_args=("state",))
def randint_from_state(state: torch.Tensor, high: int, size: list[int], device: torch.device) -> torch.Tensor:
    """torch.randint(high, size, generator=g) on `device` for the generator g of `device` whose state is `state`
    (`Generator.get_state()`, a uint8 tensor on the CPU), advancing `state` in place as the draw advances g: the same
    numbers as drawing from g itself, in an op torch.compile can put in a graph."""
    stream = torch.Generator(device=device).set_state(state)
    draw = torch.randint(high, tuple(size), device=device, generator=stream)
    state.copy_(stream.get_state())
    return draw


@randint_from_state.register_fake
def _(state: torch.Tensor, high: int, size: list[int], device: torch.device) -> torch.Tensor:
    return torch.empty(size, dtype=torch.long, device=device)


class RandomStream:
    """A torch.Generator held as its device and its state tensor: `randint` draws what the generator would and
    advances the state, through `randint_from_state`, so the draws trace into a torch.compile graph (the state
    tensor is one of its inputs) where a Generator would break it."""

    def __init__(self, generator: torch.Generator):
        self.device = generator.device
        self.state = generator.get_state()

    def randint(self, high: int, size: tuple[int, ...]) -> torch.Tensor:
        return randint_from_state(self.state, high, list(size), self.device)

    def generator(self) -> torch.Generator:
        """A new generator in the stream's current state."""
        return torch.Generator(device=self.device).set_state(self.state)


def stream_generator(generator: torch.Generator, device: torch.device | str | None) -> torch.Generator:
    """The generator whose stream a TokenMerging given `generator` for a UNet on `device` draws (from a copy):
    `generator`, or on a CUDA device, for a generator of another device, a CUDA generator seeded with its initial
    seed (the CUDA RNG that tomesd forks there, as torch.manual_seed(s) leaves it)."""
    if device is not None and torch.device(device).type == "cuda" and generator.device.type != "cuda":
        return seeded_generator(torch.device(device), generator.initial_seed())
    return generator


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A new generator of `device` seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(seed)


def fork_global_rng(device: torch.device) -> torch.Generator:
    """A new generator holding a copy of torch's global RNG state (CUDA's for a CUDA device, the CPU's otherwise):
    drawing from it leaves the global stream where it was (tomesd's `init_generator`)."""
    if device.type == "cuda":
        return torch.Generator(device=device).set_state(torch.cuda.get_rng_state(device))
    return torch.Generator().set_state(torch.get_rng_state())


def merging_at(merging: TokenMerging | None, level: int) -> TokenMerging | None:
    """The token merging of UNet level `level` (0 the latent's resolution, i downsampled 2**i): `merging` where
    2**level <= max_downsample and ratio > 0, else None (the exact path).

    tomesd infers the downsampling from the token count instead, ⌈√(h₀w₀ // n)⌉ for an h₀×w₀ latent, and takes its
    grid as ⌈h₀/d⌉×⌈w₀/d⌉. For odd latent sides that d can be below 2**level, but for sides up to 128 (checked in
    tests/test_tome.py) the two rules disagree only where tomesd would merge nothing (a side of at most 4 tokens)
    or fails (its grid is then not the block's, and its indices run past the n tokens). The level is what the
    UNet knows, and the block is given its true h, w.
    """
    if merging is None or merging.ratio == 0 or 2 ** level > merging.max_downsample:
        return None
    return merging


def partition(h: int, w: int, sx: int, sy: int, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe for SD's 2-D partition of the h×w tokens into sources and destinations: in each whole sy×sx cell the
    token `choice` (h // sy, w // sx) names is a destination; all others (the rest of each cell, and the rows and
    columns past the last whole cell) are sources. → the token ids (raster numbering) of the sources (s,) and of
    the destinations (k,).

    Their order is that of tomesd, an `argsort` of −1 (destination) / 0 (source) over the tokens. That sort is not
    stable (on the CPU beyond 16 tokens), so neither list is in raster order; the order decides nothing but which
    of exactly tied similarities wins, and the same sort of the same keys breaks those ties as tomesd does.
    """
    hc, wc = choice.shape
    in_cell = rearrange(F.one_hot(choice, sy * sx), "hc wc (sy sx) -> (hc sy) (wc sx)", sy=sy, sx=sx)
    key = torch.zeros(h, w, dtype=torch.long, device=choice.device)
    key[: hc * sy, : wc * sx] = -in_cell
    order = rearrange(key, "h w -> (h w)").argsort()  # destinations first
    return order[hc * wc:], order[: hc * wc]


@torch.no_grad()  # the matching is a choice of indices: no gradient flows through it (as in tomesd)
def bipartite_soft_matching(metric: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, r: int) -> Matching:
    """ToMe's bipartite soft matching, per batch row: every source's most similar destination by cosine similarity
    of `metric` (b, n, c); the r sources most similar to theirs merge into it, the others stay. One round, so a
    destination never merges on, and r is capped at the s sources.

    Ties (equal similarities) break as tomesd's do: the first destination, then `argsort`'s order.
    """
    unit = metric / metric.norm(dim=-1, keepdim=True)
    similarity = take(unit, src) @ take(unit, dst).transpose(-1, -2)  # (b, s, k)
    r = min(r, src.numel())
    best, into = similarity.max(dim=-1)  # (b, s): each source's best destination and its similarity
    order = best.argsort(dim=-1, descending=True)  # most similar first
    merged = order[:, :r]
    return Matching(src, dst, kept=order[:, r:], merged=merged, into=into.gather(1, merged))


@dataclass(frozen=True)
class Matching:
    """The merge and unmerge of one block call. Token ids: `src` (s,), `dst` (k,); per batch row: `kept` (b, s − r)
    and `merged` (b, r) index into `src`, `into` (b, r) the destination (an index into `dst`) each merged source
    joins.

    merge    x (b, n, c) → (b, n − r, c): the kept sources (most similar first), then the k destinations, each the
             mean of itself and the sources merged into it (unweighted: tomesd keeps no token sizes).
    unmerge  y (b, n − r, c) → (b, n, c): each kept source and each destination its own row, each merged source its
             destination's row.
    So unmerge(merge(x)) gives every token of a group (a destination and the sources merged into it) the group's
    mean, and leaves every other token as it was; with r = 0, merge is a permutation and unmerge its inverse.
    """

    src: torch.Tensor
    dst: torch.Tensor
    kept: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor

    @property
    def r(self) -> int:
        return self.merged.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        src, dst = take(x, self.src), take(x, self.dst)  # (b, s, c), (b, k, c)
        into = self.into[..., None].expand(-1, -1, x.shape[-1])
        dst = dst.scatter_reduce(1, into, take(src, self.merged), reduce="mean")  # include_self: dst is in its mean
        return torch.cat([take(src, self.kept), dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, c = y.shape
        kept, dst = y[:, : self.kept.shape[1]], y[:, self.kept.shape[1]:]
        out = y.new_zeros(b, self.src.numel() + self.dst.numel(), c)
        put(out, self.dst, dst)
        put(out, self.src[self.kept], kept)
        put(out, self.src[self.merged], take(dst, self.into))
        return out

    def around(self, sublayer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """sublayer run on the merged tokens of x, its output unmerged: (b, n, c) → (b, n, c')."""
        return self.unmerge(sublayer(self.merge(x)))


def take(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of every x (b, n, c): ids (k,) shared by the batch, or (b, k) per row → (b, k, c)."""
    if ids.ndim == 1:
        return x[:, ids]
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


def put(out: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
    """out[:, ids] = values in place, for ids (k,) or (b, k) as in `take`."""
    if ids.ndim == 1:
        out[:, ids] = values
    else:
        out.scatter_(1, ids[..., None].expand(-1, -1, out.shape[-1]), values)


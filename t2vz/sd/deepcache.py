"""DeepCache (Ma, Fang & Wang, CVPR 2024, "DeepCache: Accelerating Diffusion Models for Free"): the UNet's deep
features barely change between adjacent denoising steps, so they are computed on one step and reused on the next
ones, where only the UNet's shallow branch runs.

Branches. The UNet's skip connections, in encoder order, are numbered 0..S−1: skip 0 is `conv_in`'s output, then
each encoder layer (a resnet with its transformer, or a level's downsampler) makes one; S = levels·(L+1) for L =
`layers_per_block` (12 for SD 1.5). Each decoder layer consumes one skip, the deepest first, so the decoder layer
that consumes skip B is the (B+1)-th from the output. **Branch B** is the part of the UNet that makes or consumes
skips 0..B: `conv_in` and the first B encoder layers, and the last B+1 decoder layers (with the upsampler of a
level that ends among them). Everything between, the mid block included, is the deep part; its one output to the
branch is the feature entering the decoder layer that consumes skip B, the feature DeepCache caches (the paper's
U_{m+1}, "Cacheable Features", with branches counted per layer as in the released code). B is the released code's
`cache_branch_id`, which it splits as block B // 3, layer B % 3 for SD's L = 2; here block B // (L+1), layer
B % (L+1) (`branch_position`). Branch 0 is the shallowest: only `conv_in`, the last decoder layer and `conv_out`
run on a cached step.

Skip rule, the paper's uniform 1:N strategy ("Extending to 1:N Inference"): the calls of one denoising loop are
counted from 0, and call i is a full pass when i % N == 0 (N = `interval`); the N−1 calls after it run branch B
alone on the cached feature. N = 1 is the exact, uncached UNet.

`FeatureCache` holds that feature and the call counter for one denoising trajectory; `UNet.forward(cache=...)`
runs the full pass or the branch (t2vz/sd/unet.py).
"""
from __future__ import annotations

import torch


def skip_count(config) -> int:
    """S, the number of skip connections of a UNet with this config (`UNetConfig`): conv_in's output, L per level
    and one per downsampler, levels·(L+1) in all."""
    return len(config.block_out_channels) * (config.layers_per_block + 1)


def branch_position(branch: int, config) -> tuple[int, int]:
    """DeepCache's (block, layer) of branch `branch`: the resolution level (0 the full latent resolution) and the
    layer in it (its resnets, then its downsampler) that makes skip `branch` (layer 0 of level 0 is conv_in's skip,
    and of level l > 0 the downsampler of level l−1). ValueError naming the branch if this UNet has no such skip."""
    check_branch(branch, config)
    per_level = config.layers_per_block + 1
    return branch // per_level, branch % per_level


def check_interval(interval) -> None:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache_interval={interval!r} must be an integer >= 1 (a full UNet pass every that many "
                         "steps; 1 is no caching)")


def check_branch(branch, config=None) -> None:
    """ValueError unless `branch` is an integer >= 0 and, given a UNet `config`, one of its skips 0..S−1."""
    if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
        raise ValueError(f"cache_branch={branch!r} must be an integer >= 0 (0: the shallowest branch)")
    if config is not None and branch >= skip_count(config):
        per_level = config.layers_per_block + 1
        raise ValueError(f"cache_branch={branch} is out of range for this UNet: its branches are "
                         f"0..{skip_count(config) - 1} ({len(config.block_out_channels)} levels of {per_level} "
                         f"layers, branch = level·{per_level} + layer)")


class FeatureCache:
    """The deep feature of the last full UNet pass and the call counter of one denoising trajectory (DeepCache).

    Pass it to every `UNet.forward` call of that trajectory, one call per step (classifier-free guidance in one
    batch). A call is full when the counter is a multiple of `interval` (or nothing is cached): the whole UNet runs
    and the feature entering branch `branch`'s decoder layers is kept; otherwise only the branch runs, on that
    feature. `reset()` starts a new trajectory. A cache serves one batch shape: a cached call with another raises.
    """

    def __init__(self, interval: int, branch: int = 0):
        check_interval(interval)
        check_branch(branch)
        self.interval, self.branch = interval, branch
        self.reset()

    def reset(self) -> None:
        """Drop the cached feature and restart the count: the next call is a full pass."""
        self.calls = 0
        self.feature: torch.Tensor | None = None
        self.shape: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"FeatureCache(interval={self.interval}, branch={self.branch}, calls={self.calls})"

    def next_is_full(self) -> bool:
        """Whether the next call runs the whole UNet (DeepCache's uniform 1:N rule)."""
        return self.feature is None or self.calls % self.interval == 0

    def begin_call(self, x: torch.Tensor) -> bool:
        """Count one UNet call on input x (n, c, h, w); True when it is a full pass. A cached call needs x of the
        shape the feature was computed for: the feature belongs to those rows, and broadcasting it to others would
        silently mix trajectories."""
        full = self.next_is_full()
        if not full and tuple(x.shape) != self.shape:
            raise ValueError(f"FeatureCache holds features for an input of shape {self.shape}, but this UNet call "
                             f"has shape {tuple(x.shape)}: use one cache per denoising loop and batch, or reset() "
                             "it when the batch changes")
        self.calls += 1
        return full

    def store(self, feature: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Keep the deep feature of a full pass on an input of this shape: one tensor (the helper keeps the output
        of every layer it wraps)."""
        self.feature, self.shape = feature, tuple(shape)

"""The fast modes every pipeline offers: token merging (ToMe for SD, `sd/tome.py`) and feature caching (DeepCache,
`sd/deepcache.py`). Both approximate the UNet to run it faster; their defaults, ratio 0 and interval 1, are the
exact path bit for bit. docs/method.md says how each composes with Text2Video-Zero.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ..sd.deepcache import check_branch, check_interval
from ..sd.tome import TokenMerging
from .chunks import chunk_caches

# the TokenMerging options a caller may set through `merging_options` (ratio and max_downsample have keywords)
MERGING_OPTIONS = ("sx", "sy", "use_rand", "merge_attn", "merge_crossattn", "merge_mlp")


@dataclass(frozen=True)
class FastModes:
    """`merging_ratio` of each transformer block's tokens merged before self-attention at the UNet levels downsampled
    at most `merging_max_downsample` (1: the full latent resolution only, tomesd's default), with the rest of
    tomesd's options in `merging_options`; a full UNet pass every `cache_interval` denoising steps, the shallow
    branch `cache_branch` alone in between. The pipelines' keywords of the same names."""

    merging_ratio: float = 0.0
    merging_max_downsample: int = 1
    merging_options: dict | None = None
    cache_interval: int = 1
    cache_branch: int = 0

    @classmethod
    def of(cls, options, unet_config=None) -> FastModes:
        """The fast-mode fields of `options` (any object with these attributes, e.g. `VideoOptions`), checked
        (against the UNet too, given its `unet_config`)."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls)}).checked(unet_config)

    def checked(self, unet_config=None) -> FastModes:
        """self, or ValueError naming the first bad value and what it may be; given a UNet's `unet_config`,
        `cache_branch` must also be one of its branches (its skips)."""
        unknown = sorted(set(self.merging_options or {}) - set(MERGING_OPTIONS))
        if unknown:
            raise ValueError(f"merging_options has unknown key(s) {', '.join(unknown)}; the keys are "
                             f"{', '.join(MERGING_OPTIONS)}")
        self.token_merging(None)  # TokenMerging checks the ratio, max_downsample and the options
        check_interval(self.cache_interval)
        check_branch(self.cache_branch, unet_config)
        return self

    def token_merging(self, generator: torch.Generator | None,
                      device: str | torch.device | None = None) -> TokenMerging | None:
        """One generation's token merging for a UNet on `device`, None at ratio 0. Its random destination choices
        draw from a fork of `generator` taken now, before the generation draws from it: the generation's own stream
        is untouched, and a generator seeded with s gives the choices of tomesd after torch.manual_seed(s). On a
        CUDA device that fork is a CUDA generator seeded with the generator's seed, as tomesd draws from the CUDA
        RNG there (`TokenMerging`; without `device`, a CPU generator's choices are drawn on the CPU wherever the
        UNet runs). Without a generator, tomesd's own behaviour: a fork of torch's global RNG at the first UNet
        call (`loop_unet_kwargs` takes it just before that call where `device` is given)."""
        exact = self.merging_ratio == 0
        merging = TokenMerging(ratio=self.merging_ratio, max_downsample=self.merging_max_downsample,
                               **(self.merging_options or {}), device=device,
                               generator=None if exact else generator)  # checks the options
        return None if exact else merging

    @property
    def cache(self) -> tuple[int, int] | None:
        """(interval, branch) for `sampling.ddim_denoise` / `chunks.chunk_caches`; None at interval 1."""
        return None if self.cache_interval == 1 else (self.cache_interval, self.cache_branch)



def loop_unet_kwargs(cache: tuple[int, int] | None, merging: TokenMerging | None
                     ) -> Callable[[list[int]], dict]:
    """`kwargs(ids)`: the UNet keywords of one denoising loop's chunk of frames `ids`: the generation's `merging`,
    and the chunk's own `FeatureCache` (`chunks.chunk_caches`: made on the chunk's first call, so a new loop starts
    on a full pass). Empty on the exact path, so a wrapped or compiled UNet need not know either keyword.

    A merging without a stream yet, whose device is known, forks its stream here, just before the UNet call in
    which its first block would (nothing draws in between): the same fork, taken outside a torch.compile'd UNet,
    which cannot trace it."""
    caches = chunk_caches(cache)

    def kwargs(ids: list[int]) -> dict:
        if merging is not None and merging.device is not None:
            merging.random_stream(merging.device)
        found = {} if merging is None else {"merging": merging}
        kept = caches(ids)
        return found if kept is None else {**found, "cache": kept}
    return kwargs

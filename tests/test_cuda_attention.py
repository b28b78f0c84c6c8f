"""Token merging and the transformers' memory layout on a CUDA device: what the CPU cannot show of t2vz/sd/tome.py
and t2vz/sd/attention.py.

- tomesd draws its destination choices on CUDA from its fork of the CUDA RNG; a TokenMerging for a CUDA UNet given
  a CPU generator seeded with s draws from a CUDA generator seeded with s, so it matches tomesd after
  torch.manual_seed(s) (tests/test_tome.py's UNet oracle, on the device: fp32, TF32 off, conftest.PARITY_RTOL), and
  its draws stay on the device (no host-to-device copy, so none synchronises).
- Every transformer of an NCHW model hands on NCHW activations under cuDNN, with 1×1-conv (SD 1.5) and linear
  (SDXL) projections, in fp16.

The tests carry the `cuda` marker: skipped without a CUDA device (experiments/gpu_check.sh runs them). Written
without a GPU to run them on: the tolerance on the device is the CPU parity tests' one, not yet measured there.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_parity, without_tf32
from reference_models import TINY_UNET, diffusers_unet

from t2vz.method.fast import FastModes
from t2vz.sd.attention import Transformer2D
from t2vz.sd.loading import build_loaded
from t2vz.sd.tome import TokenMerging
from t2vz.sd.unet import UNet

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True, scope="module")
def _full_fp32():
    with without_tf32():
        yield


@pytest.fixture(scope="module")
def tiny():
    ref = diffusers_unet(TINY_UNET)
    ours = build_loaded(UNet, TINY_UNET, ref.state_dict()).eval()
    return ref.to(CUDA), ours.to(CUDA)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("stream", ["supplied", "global"])
@torch.no_grad()
def test_merging_on_cuda_matches_tomesd(tiny, stream):
    """Two UNet calls in a row, tomesd's stream forked from the CUDA RNG after torch.manual_seed(5); ours from a CPU
    generator seeded with 5 (the pipelines' `FastModes.token_merging(generator, device)`) or, without one, from the
    same fork."""
    import tomesd

    ref, ours = tiny
    x = torch.randn(2, 4, 16, 16, generator=seeded(0)).to(CUDA)
    context = torch.randn(2, 77, TINY_UNET.cross_attention_dim, generator=seeded(1)).to(CUDA)
    tomesd.apply_patch(ref, ratio=0.5)
    try:
        torch.manual_seed(5)
        expected = [ref(x, t, context).sample for t in (700, 400)]
    finally:
        tomesd.remove_patch(ref)
    torch.manual_seed(5)
    merging = FastModes(merging_ratio=0.5).checked().token_merging(seeded(5) if stream == "supplied" else None, CUDA)
    got = [ours(x, t, context, merging=merging) for t in (700, 400)]
    assert merging.generator.device.type == "cuda"
    for g, e in zip(got, expected):
        assert_parity(g, e)
    assert not torch.allclose(got[0], ours(x, 700, context), atol=1e-2)  # merging changed the output


@torch.no_grad()
def test_merging_on_cuda_draws_on_the_device():
    """A block's matching, destination draw included, runs without synchronising (a host-to-device copy of the
    draw, as when the stream was a CPU generator's, would)."""
    merging = TokenMerging(ratio=0.5, device=CUDA, generator=seeded(2))
    x = torch.randn(2, 64, 8, generator=seeded(3)).to(CUDA)
    saved = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        matching = merging.plan(x, 8, 8)
    finally:
        torch.cuda.set_sync_debug_mode(saved)
    assert matching.merged.device.type == "cuda" and matching.r == 32


@pytest.mark.parametrize("linear", [False, True], ids=["conv-projections", "linear-projections"])
@torch.no_grad()
def test_transformer_keeps_an_nchw_model_nchw_on_cuda(linear):
    model = Transformer2D(64, heads=4, context_dim=32, groups=8, linear=linear).eval().to(CUDA, torch.float16)
    seen = []
    model.proj_out.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(2, 64, 12, 10, device=CUDA, dtype=torch.float16)
    out = model(x, torch.randn(2, 7, 32, device=CUDA, dtype=torch.float16))
    assert out.is_contiguous() and out.stride() == x.stride(), out.stride()
    if not linear:
        assert seen[0].is_contiguous(), seen[0].stride()

"""Shared test helpers: the parity tolerance and the parameter perturbation every parity test uses."""
from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*torchvision.*")

# fp32 parity tolerance, stated once: 1e-4 relative, with an absolute floor of 1e-4 of the reference's largest
# magnitude (pure relative error is meaningless where the reference crosses zero).
PARITY_RTOL = 1e-4


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, rtol: float = PARITY_RTOL) -> None:
    """assert_close with rtol and atol = rtol · max|expected|; shapes and dtypes must match."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    atol = rtol * expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter away from its default init (norm weights off 1, biases off 0, zero-inits off 0).

    A mapping bug between two norms left at weight 1, bias 0 is invisible; after this, no two parameters agree.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if p.ndim == 1 and ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)  # norm gains around 1
        else:
            p.add_(scale * noise)
    return module


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

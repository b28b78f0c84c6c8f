"""Shared test helpers: the parity tolerance every parity test uses, and the parameter perturbation
(`perturb_`, defined with the reference models in experiments/reference_models.py)."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest
import torch
from reference_models import perturb_  # noqa: F401  (re-exported for the tests)
from torch.utils._python_dispatch import TorchDispatchMode

warnings.filterwarnings("ignore", message=".*torchvision.*")

# fp32 parity tolerance, stated once: 1e-4 relative, with an absolute floor of 1e-4 of the reference's largest
# magnitude (pure relative error is meaningless where the reference crosses zero).
PARITY_RTOL = 1e-4


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, rtol: float = PARITY_RTOL) -> None:
    """assert_close with rtol and atol = rtol · max|expected|; shapes and dtypes must match."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    atol = rtol * expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (experiments/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@contextmanager
def without_tf32():
    """No TF32 inside (cuDNN allows it for convolutions by default), restored afterwards: the CUDA tests compare
    fp32 with fp32. The legacy flags on purpose: mixing them with the new `fp32_precision` API makes the legacy
    getters raise."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class OpNames(TorchDispatchMode):
    """The aten ops run inside, by name (`names`): to check what a piece of code does, not what it returns."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.fixture
def one_thread():
    """One torch thread for the test: bitwise-reproducible reductions between two runs that a test compares."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clip_config():
    """A tiny CLIPConfig (t2vz's tokenizer's 49408 tokens, 32-pixel images) for random-weight CLIP scorers."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )

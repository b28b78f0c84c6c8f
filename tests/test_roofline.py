"""t2vz/experiment/roofline.py: the kernels of a forward are recorded (every convolution and every linear layer's
matmul) and timed alone; experiments/roofline.py prints the table. No timing is asserted, only that the numbers
exist and are sane. And the CPU reduced-precision set-up it measures (t2vz/sd/loading.py, t2vz/sd/onednn.py):
channels-last, prepacked convolutions that give the same values bit for bit."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from reference_models import TINY_UNET

from t2vz.experiment.roofline import KernelRecorder, roofline
from t2vz.sd.attention import BasicTransformerBlock
from t2vz.sd.loading import channels_last_for, prepare_for_device
from t2vz.sd.onednn import PrepackedConv2d, prepack_convolutions
from t2vz.sd.unet import UNet

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def test_recorder_sees_every_convolution_and_matmul():
    unet = UNet(TINY_UNET).eval()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    with KernelRecorder() as recorder:
        unet(x, 10, context)
    kinds = [call.kind for call in recorder.calls]
    assert kinds.count("convolution") == convs  # each Conv2d runs once per forward in this UNet
    assert kinds.count("matmul") >= sum(isinstance(m, torch.nn.Linear) for m in unet.modules())
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    assert kinds.count("attention") == 2 * blocks  # self- and cross-attention in each transformer block


def test_roofline_numbers_are_positive():
    unet = UNet(TINY_UNET).eval()
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    result = roofline(lambda: unet(x, 10, context), repeats=1)
    assert result["forward_s"] > 0 and result["kernels_s"] > 0 and result["flops"] > 0
    assert set(result["kinds"]) == {"convolution", "matmul", "attention"}


def test_channels_last_only_for_reduced_precision_on_the_cpu():
    assert channels_last_for("cpu", torch.bfloat16) and channels_last_for("cpu", torch.float16)
    assert not channels_last_for("cpu", torch.float32) and not channels_last_for("cuda", torch.bfloat16)
    unet = prepare_for_device(UNet(TINY_UNET).to(torch.bfloat16), "cpu", torch.bfloat16)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = unet(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), 10, torch.randn(1, 77, 32, dtype=torch.bfloat16))
    assert out.shape == (1, 4, 8, 8)


def test_script_prints_the_table():
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "roofline.py"), "--model", "tiny", "--latent",
                           "8", "--batch", "2", "--repeats", "1", "--dtypes", "fp32"], cwd=REPO / "experiments",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| fp32 |" in proc.stdout and "forward / kernels" in proc.stdout


@torch.no_grad()
def test_prepacked_convolutions_are_bit_identical_and_follow_the_weight():
    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval().to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 16, 12, dtype=torch.bfloat16)
    context = torch.randn(2, 77, 32, dtype=torch.bfloat16)
    plain = unet(x, 10, context)
    small = unet(x[:1, :, :8], 10, context[:1])  # another shape than the one the weights are packed for
    packed = prepack_convolutions(unet)
    assert isinstance(packed.conv_in, PrepackedConv2d) and set(packed.state_dict()) == set(UNet(TINY_UNET).state_dict())
    assert torch.equal(packed(x, 10, context), plain)
    assert torch.equal(packed(x[:1, :, :8], 10, context[:1]), small)
    packed.conv_in.weight.mul_(2)  # an in-place update: the packed copy is made again
    assert not torch.equal(packed(x, 10, context), plain)


def test_prepacked_convolution_trains_like_conv2d():
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    packed = PrepackedConv2d.of(conv)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    packed(x).sum().backward()  # with grad enabled it is nn.Conv2d itself
    assert conv.weight.grad is not None and x.grad is not None

"""No host-to-device copies inside the denoising loops: what a loop needs on the device (the timesteps, the control
maps, the chunks' frames) is put there once before it, so that no step waits on a transfer from the host.

The CPU shows it with the `meta` device standing in for an accelerator: the models are moved to it (their values
are dropped; shapes flow through every op as they would on a GPU), and a dispatch mode records every op that takes
a CPU tensor and returns a meta one (`HostToDevice`). A loop that copies something per step makes more such ops the
more steps it runs; the tests run each pipeline at two step counts and ask for the same count. The copies before
the loop (x_T drawn from a CPU generator, the embeddings, the timesteps: one per loop) are what remains. DDIM with
η > 0 draws its noise from the CPU generator at every step (diffusers' random stream): these tests use η = 0.
"""
from __future__ import annotations

import collections
import dataclasses
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import t2vz
from t2vz import ControlNet, ControlNetConfig, UNet
from t2vz.method import controlvideo, instruct, text2video_zero
from t2vz.method.chunks import frame_span
from t2vz.method.motion import translation_path, warp_latents
from t2vz.method.sampling import ddim_loop
from t2vz.sd.loading import StableDiffusion
from t2vz.sd.schedulers import DDIM

META = torch.device("meta")
COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class HostToDevice(TorchDispatchMode):
    """Counts the ops that bring CPU data to another device, by the t2vz line that ran them: copies (`.to`,
    `copy_`) of a CPU tensor and ops reading a CPU tensor of ≥ 1 dimension, seen by the dispatch mode; and what
    it cannot see, as torch builds those tensors on the host and copies them below the dispatcher: indexing a
    device tensor with a Python list (`x[ids]`, `x[:, ids] = y`) and `torch.tensor`/`torch.as_tensor` of Python
    data with a device. 0-dim CPU tensors in arithmetic are scalars (the scheduler's ᾱ_t), kernel arguments."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()
        self.saved = {(torch.Tensor, "__getitem__"): torch.Tensor.__getitem__,
                      (torch.Tensor, "__setitem__"): torch.Tensor.__setitem__,
                      (torch, "tensor"): torch.tensor, (torch, "as_tensor"): torch.as_tensor}

    def record(self, what: str) -> None:
        ours = [f for f in traceback.extract_stack() if "/t2vz/" in f.filename]
        where = f"{ours[-1].filename.split('/t2vz/')[-1]}:{ours[-1].lineno}" if ours else "outside t2vz"
        self.sites[f"{what} at {where}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(o, torch.Tensor) and o.device.type != "cpu" for o in tree_leaves(out)) and any(
                isinstance(a, torch.Tensor) and a.device.type == "cpu" and (a.ndim > 0 or func in COPIES)
                for a in tree_leaves((args, kwargs))):
            self.record(str(func))
        return out

    def watched(self, owner, name: str):
        """`owner.name` recording its calls that send host data to a device."""
        original = self.saved[owner, name]
        if name.startswith("__"):  # indexing: a list among the keys of a device tensor
            def call(tensor, key, *value):
                keys = key if isinstance(key, tuple) else (key,)
                if tensor.device.type != "cpu" and any(isinstance(k, list) for k in keys):
                    self.record(f"x[list]{' =' if value else ''}")
                return original(tensor, key, *value)
        else:  # torch.tensor / torch.as_tensor of Python data (not a tensor) made on a device
            def call(data, *args, device=None, **kwargs):
                if device is not None and torch.device(device).type != "cpu" and not isinstance(data, torch.Tensor):
                    self.record(f"torch.{name}(data, device)")
                return original(data, *args, device=device, **kwargs)
        return call

    def __enter__(self):
        for owner, name in self.saved:
            setattr(owner, name, self.watched(owner, name))
        return super().__enter__()

    def __exit__(self, *exc):
        for (owner, name), original in self.saved.items():
            setattr(owner, name, original)
        return super().__exit__(*exc)

    @property
    def count(self) -> int:
        return sum(self.sites.values())


def copies(run) -> HostToDevice:
    """The host-to-device ops of `run()`."""
    with torch.no_grad(), HostToDevice() as counter:
        run()
    return counter


def assert_none_per_step(run_steps, steps=(2, 4)):
    """`run_steps(n)` makes as many host-to-device copies at every step count: none inside the loop."""
    few, many = (copies(lambda n=n: run_steps(n)) for n in steps)
    assert many.count == few.count, (f"{steps[1]} steps copy {many.count} times, {steps[0]} steps {few.count}: "
                                     f"per step {dict(many.sites - few.sites)}")


@pytest.fixture(scope="module")
def toy():
    """The shipped toy model with its UNet and VAE on `meta`, the prompt's embeddings computed on the CPU."""
    sd = t2vz.load("toyworld")
    text, uncond = sd.text_encoder(["a red circle on grass"]), sd.text_encoder([""])
    sd.unet.to(META)
    sd.vae.to(META)
    return sd, dict(prompt_embeds=text, negative_prompt_embeds=uncond)


@pytest.fixture(autouse=True)
def _no_decoding(monkeypatch):
    """Decoding ends in `.cpu()`, which a meta tensor refuses: the pipelines return their final latents."""
    for module in (text2video_zero, controlvideo, instruct):
        monkeypatch.setattr(module, "decode_video", lambda sd, x, f: x[None])


def test_the_counter_sees_every_kind_of_copy_and_no_scalar():
    x, ids, scalar = torch.zeros(4, 2, device=META), [0, 1], torch.tensor(2.0)
    sends = [lambda: torch.ones(3).to(META), lambda: x.copy_(torch.ones(4, 2)), lambda: x[ids],
             lambda: x.__setitem__((slice(None), ids), 1.0), lambda: torch.tensor(ids, device=META),
             lambda: torch.as_tensor(3, device=META)]
    for send in sends:
        assert copies(send).count == 1
    stays = [lambda: x * scalar, lambda: x[1:3], lambda: torch.arange(3, device=META), lambda: torch.tensor(ids)]
    for stay in stays:
        assert copies(stay).count == 0
    assert torch.Tensor.__getitem__ is HostToDevice().saved[torch.Tensor, "__getitem__"]  # restored


def test_frame_span_takes_a_chunk_as_a_view():
    """A chunk's frames (consecutive ids, `chunks.frame_chunks`) are a slice of the tensor; other ids are refused."""
    frames = torch.arange(5.0)[:, None].expand(5, 3)
    assert torch.equal(frames[frame_span([2, 3, 4])], frames[2:5])
    assert frames[frame_span([2, 3, 4])].data_ptr() == frames[2].data_ptr()
    with pytest.raises(ValueError, match="not consecutive"):
        frame_span([0, 3])
    assert copies(lambda: torch.zeros(5, 3, device=META)[frame_span([1, 2, 3])]).count == 0


def test_ddim_loop_copies_the_timesteps_once():
    """The UNet's t comes from one device copy of the timesteps (made per loop), on x's device."""
    seen = []

    def predict_eps(x, t):
        seen.append(t.device)
        return torch.zeros_like(x)

    for n in (3, 6):
        counter = copies(lambda: ddim_loop(torch.zeros(2, 4, 8, 8, device=META), DDIM(n), DDIM(n).timesteps,
                                           predict_eps, progress=False))
        assert counter.count == 1, dict(counter.sites)
    assert set(seen) == {META}


def test_warp_copies_nothing_to_the_device():
    """The path's numbers reach the grid's kernels as Python scalars: no tensor goes from the host."""
    counter = copies(lambda: warp_latents(torch.zeros(3, 4, 16, 16, device=META), translation_path([1, 2, 3], 12.0)))
    assert counter.count == 0, dict(counter.sites)


@pytest.mark.parametrize("options", [{}, {"num_frames": 1}, {"t0": 1, "t1": 1}, {"motion_dynamics": False},
                                     {"smooth_bg": True, "masks": torch.ones(3, 8, 8)}, {"chunk_size": 2}])
def test_text_to_video_copies_nothing_per_step(toy, options):
    """Frame 1's two loops and the video's: one copy of the timesteps each; the warp and the per-step background
    smoothing (which warps at every step) copy no path. t1 = n/2, t0 = t1 − 1: every loop runs more steps at 8
    steps (3, 1, 5) than at 4 (1, 1, 3)."""
    sd, embeds = toy
    pipe = t2vz.TextToVideoZero(sd)

    def run(n: int):
        kwargs = dict(num_frames=3, t0=n // 2 - 1, t1=n // 2, progress=False, **embeds) | options
        return pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=n, **kwargs)
    assert_none_per_step(run, steps=(4, 8))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_control_video_copies_nothing_per_step(toy, chunk_size):
    """The control maps go to the device once, before the loop (they were copied for every step and chunk)."""
    sd, embeds = toy
    config = ControlNetConfig.from_unet(sd.unet.config, conditioning_embedding_out_channels=(8, 16, 16))
    assert config.control_downscale == sd.vae.downsample_factor
    with torch.device(META):
        pipe = controlvideo.ControlVideo(sd, ControlNet(config))
    maps = torch.rand(3, 32, 32, 3)
    assert_none_per_step(lambda n: pipe(control=maps, num_inference_steps=n, progress=False, chunk_size=chunk_size,
                                        generator=torch.Generator().manual_seed(0), **embeds))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_instruct_pix2pix_copies_nothing_per_step(toy, chunk_size):
    """The chunk's source latents E(x) are a view of the device tensor, not an index sent to it at every step."""
    sd, embeds = toy
    with torch.device(META):
        unet = UNet(dataclasses.replace(sd.unet.config, in_channels=8))
    pipe = instruct.VideoInstructPix2Pix(StableDiffusion(unet, sd.vae, sd.text_encoder))
    video = torch.rand(3, 32, 32, 3)
    assert_none_per_step(lambda n: pipe(video=video, num_inference_steps=n, progress=False, chunk_size=chunk_size,
                                        generator=torch.Generator().manual_seed(0), **embeds))

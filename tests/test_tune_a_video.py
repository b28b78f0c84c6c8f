"""Tune-A-Video: the inflated UNet (temporal attention, `sd/temporal.py`), one-shot tuning and editing
(`method/tune_a_video.py`), the tuned-weights file and `t2vz.load(base, tuned=FILE)`, and the entry point
experiments/tune_a_video.py (a smoke run on the toy model, and its bad inputs)."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import t2vz
from t2vz.method.tune_a_video import (
    SPARSE_CAUSAL, TRAINABLE, TuneAVideo, checkpointed, denoising_loss, encode_frames, save_tuned, trainable_parameters,
    tune,
)
from t2vz.sd.attention import AnchorKeys, BasicTransformerBlock, CrossFrame
from t2vz.sd.schedulers import DDPM
from t2vz.sd.temporal import TunedWeightsError, inflate, is_inflated, temporal_attention, temporal_keys
from t2vz.sd.tome import TokenMerging
from t2vz.video_io import write_video
from weights_convert.random_model import write_random_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(REPO / "experiments" / "tune_a_video.py"), "logger=disabled", "output.progress=false"]
PROMPT = "a red square on grass"


def square_video(f: int, size: int = 64) -> torch.Tensor:
    """A red square moving right on green, (f, size, size, 3) in [0, 1]."""
    frames = torch.zeros(f, size, size, 3)
    frames[..., 1] = 0.6
    s = size // 4
    for k in range(f):
        frames[k, s + s // 4 : 2 * s + s // 4, s // 2 + 2 * k : s // 2 + 2 * k + s] = torch.tensor([1.0, 0.0, 0.0])
    return frames


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two different tiny random models (one tuned file of the first), the toy model's square video, a shorter
    one, a file that is no video."""
    root = tmp_path_factory.mktemp("tune_a_video")
    m1, m2 = write_random_model(root / "m1", seed=1), write_random_model(root / "m2", seed=2)
    sd = t2vz.load(m1)
    tuned = save_tuned(root / "m1_tuned.safetensors", inflate(sd.unet), m1, num_frames=4, prompt="x")
    (root / "garbage.mp4").write_bytes(bytes(range(256)) * 8)
    return dict(m1=m1, m2=m2, tuned=tuned, video=write_video(root / "square.gif", square_video(8)),
                short=write_video(root / "short.gif", square_video(3)), garbage=root / "garbage.mp4")


@pytest.fixture(scope="module")
def cli_runs(files, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The entry point's runs, two at a time (name → (process, its run folder)): a smoke run on the toy model and
    the bad inputs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(REPO)}
    video = f"source_video={files['video']}"
    cases = {
        "smoke": [video, f"prompt={PROMPT}", "num_frames=4", "tune.steps=2", "sampler.num_inference_steps=2",
                  "edit_prompts=[a blue square on grass,a red square on snow]"],
        "short-video": [f"source_video={files['short']}", "prompt=x"],
        "not-a-video": [f"source_video={files['garbage']}", "prompt=x"],
        "other-base": [video, f"tuned={files['tuned']}"],
        "unknown-module": [video, "prompt=x", "tune.trainable=[attn1.to_q,attn3.to_q]"],
        "bad-lr": [video, "prompt=x", "tune.lr=nan"],
    }

    def run(name: str):
        out = tmp_path_factory.mktemp(name) / "run"
        proc = subprocess.run([*SCRIPT, *cases[name], f"hydra.run.dir={out}"], capture_output=True, text=True,
                              env=env, cwd=out.parent, timeout=600)
        return name, (proc, out)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, cases))


@pytest.fixture(scope="module")
def toy():
    return t2vz.load("toyworld")


# ------------------------------------------------------------------------------------------- the inflated UNet
@torch.no_grad()
def test_untuned_inflated_unet_is_the_image_unet(files):
    """Zero-initialised output projections (weight and bias): the untuned inflated UNet is the image UNet with
    sparse-causal attention, bit for bit, 2 videos of 3 frames, with and without token merging."""
    image = t2vz.load(files["m1"]).unet
    keys = set(image.state_dict())
    inflated = inflate(copy.deepcopy(image))
    assert is_inflated(inflated) and not is_inflated(image) and not any("_temp." in k for k in keys)
    assert set(inflated.state_dict()) - keys == set(temporal_keys(inflated)) and temporal_keys(inflated)
    assert {k.split(".")[-2] for k in temporal_keys(inflated)} == {"norm_temp", "to_q", "to_k", "to_v", "0"}
    x, context = torch.randn(6, 4, 8, 8), torch.randn(2, 77, 32)
    cross_frame = CrossFrame(3, SPARSE_CAUSAL)
    for extra in ({}, {"merging": TokenMerging(0.5, use_rand=False)}):
        assert torch.equal(inflated(x, 500, context, cross_frame=cross_frame, **extra),
                           image(x, 500, context, cross_frame=cross_frame, **extra))
    assert inflate(inflated) is inflated and len(temporal_keys(inflated)) == len(temporal_keys(inflate(inflated)))


@torch.no_grad()
def test_temporal_layer_is_attention_over_frames():
    """temporal_attention against softmax(Q Kᵀ/√d) V by hand over the f frames of each spatial position, with
    random output projections and LayerNorm; without a CrossFrame each row is a one-frame video."""
    torch.manual_seed(0)
    holder = torch.nn.ModuleList([BasicTransformerBlock(16, 2, 8)])
    inflate(holder)
    block = holder[0]
    for p in [*block.attn_temp.parameters(), *block.norm_temp.parameters()]:
        p.copy_(torch.randn_like(p) * 0.5)
    b, f, n, c, heads = 2, 3, 5, 16, 2
    x = torch.randn(b * f, n, c)

    def by_hand(x: torch.Tensor, f: int) -> torch.Tensor:
        attn, d = block.attn_temp, c // heads
        out = x.clone()
        for v in range(x.shape[0] // f):
            for pos in range(n):
                seq = x[v * f : (v + 1) * f, pos]  # (f, c): this position in every frame of video v
                y = F.layer_norm(seq, (c,), block.norm_temp.weight, block.norm_temp.bias)
                q, k, val = y @ attn.to_q.weight.T, y @ attn.to_k.weight.T, y @ attn.to_v.weight.T
                mixed = torch.cat([torch.softmax(q[:, h * d : (h + 1) * d] @ k[:, h * d : (h + 1) * d].T / math.sqrt(d),
                                                 dim=-1) @ val[:, h * d : (h + 1) * d] for h in range(heads)], dim=1)
                out[v * f : (v + 1) * f, pos] = seq + mixed @ attn.to_out[0].weight.T + attn.to_out[0].bias
        return out

    torch.testing.assert_close(temporal_attention(block, x, CrossFrame(f, SPARSE_CAUSAL)), by_hand(x, f))
    torch.testing.assert_close(temporal_attention(block, x, None), by_hand(x, 1))
    context = torch.randn(b, 7, 8)  # the block's forward ends with the layer, after the feed-forward
    block.temporal = None
    before = block(x, context, CrossFrame(f, SPARSE_CAUSAL))
    block.temporal = temporal_attention
    assert torch.equal(block(x, context, CrossFrame(f, SPARSE_CAUSAL)),
                       temporal_attention(block, before, CrossFrame(f, SPARSE_CAUSAL)))


def test_chunks_and_levels_are_refused(files):
    unet = inflate(t2vz.load(files["m1"]).unet)
    x, context = torch.randn(4, 4, 8, 8), torch.randn(1, 77, 32)
    with pytest.raises(ValueError, match="chunk_size cannot be used with a Tune-A-Video model"):
        unet(x, 1, context, cross_frame=CrossFrame(4, "first", anchor=AnchorKeys()))
    with pytest.raises(ValueError, match=r"cross_frame_levels=\[0\] cannot be used with a Tune-A-Video model"):
        unet(x, 1, context, CrossFrame(4, "first", levels=(0,)))


# ------------------------------------------------------------------------------------------------------ tuning
def test_gradients_reach_only_the_trained_set(files):
    """One backward of the tuning loss: exactly the trained tensors get gradients, all non-zero (attn_temp's
    output projection moved off zero first, or its input projections would get zero ones); checkpointing gives
    the same gradients; a tuning step changes exactly the trained set (norm_temp stays at its init)."""
    sd = t2vz.load(files["m1"])
    unet = inflate(sd.unet)
    with torch.no_grad():
        for block in unet.modules():
            if isinstance(block, BasicTransformerBlock):
                block.attn_temp.to_out[0].weight.normal_(0, 0.1)
    params = trainable_parameters(unet, TRAINABLE)
    assert params and all(k.endswith(("attn1.to_q.weight", "attn2.to_q.weight")) or ".attn_temp." in k for k in params)
    for p in params.values():
        p.requires_grad_(True)
    z0, context = torch.randn(3, 4, 4, 4), torch.randn(1, 77, 32)
    grads = []
    for checkpointing in (False, True):
        with checkpointed(unet, checkpointing):
            denoising_loss(unet, z0, context, 3, DDPM(), torch.Generator().manual_seed(0)).backward()
        got = {k: p.grad for k, p in unet.named_parameters() if p.grad is not None}
        assert set(got) == set(params)
        assert all(g.abs().sum() > 0 for g in got.values())
        grads.append({k: g.clone() for k, g in got.items()})
        unet.zero_grad(set_to_none=True)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k])

    before = copy.deepcopy(unet.state_dict())
    tune(sd, square_video(3, 32), "x", steps=1, lr=1e-3, height=32, width=32, progress=False)
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(params)
    assert not any(p.requires_grad for p in unet.parameters())


def test_the_loss_falls(toy):
    """A few steps at a high learning rate on the toy model (4 frames of 64×64): the loss at fixed (t, ε) falls."""
    frames = square_video(4)
    mean, _ = encode_frames(toy, frames)
    z0 = mean * toy.vae.config.scaling_factor
    context = toy.text_encoder([PROMPT])

    @torch.no_grad()
    def fixed_loss() -> float:
        g, ddpm = torch.Generator().manual_seed(1), DDPM()
        losses = []
        for t in (50, 250, 500, 750):
            eps = torch.randn(z0.shape, generator=g)
            pred = toy.unet(ddpm.q_sample(z0, t, eps), t, context, cross_frame=CrossFrame(4, SPARSE_CAUSAL))
            losses.append(F.mse_loss(pred, eps).item())
        return sum(losses) / len(losses)

    inflate(toy.unet)
    before = fixed_loss()
    seen = []
    losses = tune(toy, frames, PROMPT, steps=8, lr=1e-3, generator=torch.Generator().manual_seed(0), progress=False,
                  on_step=lambda step, loss: seen.append((step, loss)))
    assert seen == list(enumerate(losses, start=1)) and len(losses) == 8
    assert fixed_loss() < 0.75 * before


# --------------------------------------------------------------------------------------- the tuned-weights file
def test_tuned_weights_round_trip(files, tmp_path):
    """tune → save → t2vz.load(base, tuned=FILE): the same UNet outputs, bit for bit; the file holds the trained
    tensors and every temporal layer's, and says which base, modules, frames and prompt."""
    pipe = TuneAVideo.from_pretrained(files["m1"])
    pipe.tune(square_video(4, 32), "a square", height=32, width=32, steps=2, lr=1e-3,
              generator=torch.Generator().manual_seed(0), progress=False)
    file = pipe.save(tmp_path / "tuned.safetensors")
    with safe_open(str(file), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    trained = set(trainable_parameters(pipe.sd.unet, TRAINABLE))
    assert keys == trained | set(temporal_keys(pipe.sd.unet)) and any("norm_temp" in k for k in keys - trained)
    assert not any(".attn1.to_k." in k or ".ff." in k for k in keys)
    assert meta["base_model"] == str(files["m1"]) and json.loads(meta["trainable"]) == list(TRAINABLE)
    assert (meta["num_frames"], meta["prompt"]) == ("4", "a square") and len(meta["base_unet_sha256"]) == 64

    again = TuneAVideo.from_pretrained(files["m1"], tuned=file)
    assert (again.num_frames, again.prompt, again.trainable) == (4, "a square", TRAINABLE)
    x, context = torch.randn(4, 4, 4, 4), torch.randn(1, 77, 32)
    with torch.no_grad():
        ours = [s.unet(x, 300, context, cross_frame=CrossFrame(4, SPARSE_CAUSAL)) for s in (pipe.sd, again.sd)]
    assert torch.equal(*ours)
    edited = again.edit(square_video(4, 32), ["a square", "a circle"], num_inference_steps=2, height=32, width=32,
                        progress=False)
    assert edited.shape == (2, 4, 32, 32, 3) and torch.isfinite(edited).all()


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_python_arguments_name_the_value(files, tmp_path):
    with pytest.raises(TunedWeightsError) as info:  # a ValueError
        t2vz.load(files["m2"], tuned=files["tuned"])
    message = str(info.value)
    assert str(files["m1"]) in message and str(files["m2"]) in message and "\n" not in message
    assert isinstance(info.value, ValueError)
    (tmp_path / "junk.safetensors").write_bytes(b"\x07" * 64)
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        t2vz.load(files["m1"], tuned=tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="not Tune-A-Video weights"):
        t2vz.load(files["m1"], tuned=files["m1"] / "unet.safetensors")
    with pytest.raises(ValueError, match="do not exist"):
        t2vz.load(files["m1"], tuned=tmp_path / "nothing.safetensors")

    sd = t2vz.load(files["m1"])
    with pytest.raises(ValueError, match="'attn3.to_q' match no module .* e.g. attn1.to_q"):
        tune(sd, square_video(2, 32), "x", trainable=["attn1.to_q", "attn3.to_q"], steps=1, progress=False)
    with pytest.raises(ValueError, match="num_frames=5 but the video has only 4 frames"):
        tune(sd, square_video(4, 32), "x", num_frames=5, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps=0"):
        tune(sd, square_video(2, 32), "x", steps=0)
    with pytest.raises(ValueError, match="lr=nan"):
        tune(sd, square_video(2, 32), "x", lr=float("nan"))
    with pytest.raises(ValueError, match="prompts=\\[\\] must be"):
        TuneAVideo(sd).edit(square_video(2, 32), [], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="tunes in float32"):
        tune(t2vz.load(files["m1"], dtype=torch.bfloat16), square_video(2, 32), "x", steps=1)


@pytest.mark.parametrize("name, expected", [
    ("short-video", "num_frames=8 but source_video {root}/short.gif has only 3 frames"),
    ("not-a-video", "cannot read {root}/garbage.mp4"),
    ("other-base", "tuned weights {root}/m1_tuned.safetensors were tuned from base model {root}/m1"),
    ("unknown-module", "trainable module name(s) 'attn3.to_q' match no module"),
    ("bad-lr", "tune.lr=nan must be a finite number"),
])
def test_bad_input_through_the_entry_point(cli_runs, files, name, expected):
    proc, out = cli_runs[name]
    expected = expected.format(root=files["m1"].parent)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("t2vz: error: "), proc.stderr[-3000:]
    assert expected in errors[0], (expected, errors[0])
    assert not [p for p in out.rglob("*") if p.suffix in (".mp4", ".gif", ".png", ".safetensors", ".yaml")
                and ".hydra" not in p.parts]
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"


def test_entry_point_smoke_run(cli_runs):
    """Toy model, 2 tuning steps, 2 edit prompts, 2 DDIM steps: the tuned weights, two videos, run.json."""
    proc, out = cli_runs["smoke"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert [e["prompt"] for e in run["edits"]] == ["a blue square on grass", "a red square on snow"]
    assert run["frames"] == [4, 64, 64, 3] and len(run["tune"]["losses"]) == 2
    for i in range(2):
        assert all((out / f"video_{i}{suffix}").is_file() for suffix in (".mp4", ".gif", "_sheet.png"))
    assert (out / "config.yaml").is_file() and json.loads((out / "metrics.json").read_text())["status"] == "ok"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".hydra"]  # no temporary file left
    sd = t2vz.load("toyworld", tuned=out / "tuned.safetensors")
    assert is_inflated(sd.unet) and sd.config["tuned"]["prompt"] == PROMPT and sd.config["tuned"]["num_frames"] == 4


def test_the_job_logs_the_loss_of_every_step(files):
    """The job's config as Hydra composes it (the authors' defaults), and its tuning run in-process: every step's
    loss goes to the tracker (W&B), in order; no edit prompts: the source prompt itself."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import t2vz.experiment.config  # noqa: F401  (the shared ConfigStore nodes)
    from t2vz.experiment.tune_runs import tune_and_edit

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("tune_experiment", overrides=[
            f"source_video={files['video']}", "prompt=a square", f"model={files['m1']}", "num_frames=2", "height=32",
            "width=32", "tune.steps=3", "sampler.num_inference_steps=2", "output.progress=false"])
    assert (cfg.tune.lr, cfg.tune.trainable, cfg.sampler.guidance_scale) == (3e-5, list(TRAINABLE), 12.5)

    class Recorder:
        logged: list[dict] = []

        def log_metrics(self, metrics: dict) -> None:
            self.logged.append(dict(metrics))

    tracker = Recorder()
    _, info, videos = tune_and_edit(OmegaConf.to_object(cfg), tracker)
    assert [m["step"] for m in tracker.logged] == [1, 2, 3]
    assert [m["loss"] for m in tracker.logged] == info["tune"]["losses"]
    assert info["prompts"] == ["a square"] and videos.shape == (1, 2, 32, 32, 3)

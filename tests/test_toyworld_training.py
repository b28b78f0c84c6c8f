"""experiments/train_toyworld.py's stages on a tiny configuration: the exported folder loads with `t2vz.load`,
an interrupted run resumes to exactly the weights of an unbroken one, and stale checkpoints are refused."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import t2vz
from t2vz.toyworld.training import (DataConfig, GrowConfig, TextTrainConfig, TrainConfig, UNetTrainConfig,
                                    VAETrainConfig, train)
from t2vz.experiment.tracking import LoggerConfig

REPO = Path(__file__).resolve().parents[1]


def tiny(tmp: Path, name: str, vae_steps: int = 4, unet_steps: int = 4, grow_steps: int = 0) -> TrainConfig:
    return TrainConfig(
        workdir=str(tmp / name / "work"), out=str(tmp / name / "model"), checkpoint_every=2, progress=False,
        data=DataConfig(num_images=48), logger=LoggerConfig(enabled=False),
        vae=VAETrainConfig(block_out_channels=[8, 8, 8], steps=vae_steps, batch_size=4),
        unet=UNetTrainConfig(block_out_channels=[8, 16, 16], num_attention_heads=2, steps=unet_steps, batch_size=4,
                             warmup=2, grow=GrowConfig(levels=[True, False, False], steps=grow_steps, warmup=1)),
        text=TextTrainConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: bitwise-reproducible runs to compare


def test_the_exported_folder_is_a_t2vz_model_with_its_recipe(tmp_path):
    out = train(tiny(tmp_path, "a"), "python experiments/train_toyworld.py data.num_images=48", "seed: 0\n")
    sd = t2vz.load(out)
    assert sd.sample_size == 64 and sd.vae.downsample_factor == 4 and sd.config["variant"] == "toyworld"
    assert sd.config["source"]["command"].endswith("data.num_images=48") and sd.config["source"]["seed"] == 0
    assert all(v.dtype == torch.float16 for v in load_file(str(out / "unet.safetensors")).values())
    image = t2vz.text_to_image(sd, "a red circle on grass", num_inference_steps=3, progress=False,
                               generator=torch.Generator().manual_seed(0))
    assert image.shape == (64, 64, 3) and torch.isfinite(image).all()


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A run killed right after a checkpoint (inside the VAE stage, then inside the UNet's, then inside the
    attention growth), re-run with the same command, ends with exactly the weights of an unbroken run: the
    learning-rate schedule, batches and noise go on where they stopped."""
    from t2vz.toyworld import training

    whole = train(tiny(tmp_path, "whole", grow_steps=4), "cmd", "")
    real_save = training.save_atomic

    def killed_after(stage: str, step: int):
        def save(obj, path):
            real_save(obj, path)
            if path.stem == stage and obj["step"] == step:
                raise KeyboardInterrupt(f"killed after {stage} step {step}")
        return save

    for stage, step in (("vae", 2), ("unet", 2), ("unet_grown", 2)):
        monkeypatch.setattr(training, "save_atomic", killed_after(stage, step))
        with pytest.raises(KeyboardInterrupt, match=f"{stage} step {step}"):
            train(tiny(tmp_path, "broken", grow_steps=4), "cmd", "")
    monkeypatch.setattr(training, "save_atomic", real_save)
    resumed = train(tiny(tmp_path, "broken", grow_steps=4), "cmd", "")
    for name in ("unet", "vae", "text_encoder"):
        a, b = load_file(str(whole / f"{name}.safetensors")), load_file(str(resumed / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_growing_attention_starts_from_the_trained_unet_and_ships_the_grown_one(tmp_path):
    """Stage 3b adds transformer blocks at 16×16 with zeroed output projections, so before its first step the grown
    model predicts exactly what stage 3's did; the exported folder has the grown UNet."""
    from t2vz.sd.text_encoder import build_clip_text_model
    from t2vz.toyworld.training import Denoiser, grow_from, grown_levels, text_config, unet_config
    from t2vz.sd.unet import UNet

    cfg = tiny(tmp_path, "g", grow_steps=2)
    assert grown_levels(cfg.unet) == [True, True, True] and grown_levels(tiny(tmp_path, "n").unet) == [False, True, True]
    text_cfg = text_config(cfg.text)
    torch.manual_seed(0)
    trained = Denoiser(UNet(unet_config(cfg.unet, 16)), build_clip_text_model(text_cfg)).eval()
    grown = Denoiser(UNet(unet_config(cfg.unet, 16, grown_levels(cfg.unet))), build_clip_text_model(text_cfg)).eval()
    assert grow_from(grown, trained) == ["unet.down_blocks.0.attentions.0", "unet.up_blocks.2.attentions.0",
                                         "unet.up_blocks.2.attentions.1"]
    x, t, ids = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        assert torch.equal(grown(x, t, ids), trained(x, t, ids))
    with pytest.raises(ValueError, match="may only add attention levels"):
        grow_from(trained, grown)

    out = train(cfg, "cmd", "")
    assert list(t2vz.load(out).config["unet"]["attention_levels"]) == [True, True, True]
    assert any(k.startswith("down_blocks.0.attentions.0.") for k in load_file(str(out / "unet.safetensors")))
    longer = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, steps=6))
    with pytest.raises(ValueError, match="delete .*unet_grown.pt"):
        train(longer, "cmd", "")


def test_the_learning_rate_warms_up_then_decays_to_zero_on_a_cosine():
    from t2vz.toyworld.training import lr_at

    lrs = [lr_at(step, 1e-3, 10, 110) for step in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # warm-up: (step + 1) / 10 of the peak
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(0.5e-3) and lrs[110] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after the warm-up


def test_min_snr_weights_the_clean_timesteps_down_and_leaves_the_noisy_ones_at_one():
    from t2vz.sd.schedulers.noise_schedule import scaled_linear_alphas_cumprod
    from t2vz.toyworld.training import min_snr_weight

    alphas_cumprod = scaled_linear_alphas_cumprod()[2]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    w = min_snr_weight(alphas_cumprod, 5.0)
    assert torch.equal(w[snr <= 5], torch.ones_like(w[snr <= 5]))
    torch.testing.assert_close(w[snr > 5], 5 / snr[snr > 5])
    assert 0 < w[0] < 0.01 and w[-1] == 1  # t = 0 (SNR ≈ 1175) counts ~0.4%; the noisiest t counts fully
    assert torch.equal(min_snr_weight(alphas_cumprod, 0.0), torch.ones_like(alphas_cumprod))


def test_a_unet_checkpoint_on_another_vae_is_refused(tmp_path):
    cfg = tiny(tmp_path, "c")
    train(cfg, "cmd", "")
    longer_vae = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, steps=6))
    with pytest.raises(ValueError, match="delete .*unet.pt"):
        train(longer_vae, "cmd", "")


def test_checkpoints_made_on_another_world_are_refused_not_resumed(tmp_path, monkeypatch):
    """The caches and checkpoints are keyed on what the world renders, so a changed renderer (here, another
    horizon range) starts from fresh data instead of resuming on the old world's images."""
    from t2vz.toyworld import training, world

    cfg = tiny(tmp_path, "d", vae_steps=2, unet_steps=0)
    train(cfg, "cmd", "")
    before = training.dataset_key(cfg.data)
    monkeypatch.setattr(world, "HORIZON", (0.3, 0.4))
    assert training.dataset_key(cfg.data) != before
    with pytest.raises(ValueError, match="another dataset .*new workdir"):
        train(cfg, "cmd", "")


def test_the_entry_point_has_help_and_rejects_a_typo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = str(REPO / "experiments" / "train_toyworld.py")
    ok = subprocess.run([sys.executable, script, "--cfg", "job"], env=env, text=True, capture_output=True,
                        cwd=tmp_path, timeout=120)
    assert ok.returncode == 0 and "unet:" in ok.stdout and "caption_dropout: 0.1" in ok.stdout
    bad = subprocess.run([sys.executable, script, "unet.stepz=3"], env=env, text=True, capture_output=True,
                         cwd=tmp_path, timeout=120)
    assert bad.returncode != 0 and "stepz" in bad.stderr
    short = subprocess.run([sys.executable, script, f"workdir={tmp_path / 'w'}", "unet.grow.levels=[true]",
                            "unet.grow.steps=1"], env=env, text=True, capture_output=True, cwd=tmp_path, timeout=120)
    assert short.returncode != 0 and "one entry per level" in short.stderr and "Traceback" not in short.stderr
    assert not (tmp_path / "w").exists()  # refused before any stage ran

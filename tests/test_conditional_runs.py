"""experiments/control_video.py and experiments/instruct_video.py: their configs compose and check values, their
declared sweeps compose, and two-point sweeps run end to end on tiny models with W&B offline, logged like the
text-to-video runs; a bad control video fails its job with one line and the sweep goes on. The model is a
single-file checkpoint converted with `python -m weights_convert`, as a DreamBooth fine-tune would be."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from ldm_fixtures import TINY_UNET, tiny_ldm_checkpoint, write_checkpoint
from reference_models import tiny_instruct_pix2pix_folder

import t2vz.experiment.conditional_runs  # noqa: F401  (registers the ConfigStore nodes)
import t2vz.experiment.config  # noqa: F401
from t2vz import ControlNet, ControlNetConfig, ControlVideo, VideoInstructPix2Pix
from t2vz.experiment.conditional_runs import CONTROL_VIDEO, INSTRUCT_VIDEO, control_maps
from t2vz.sd.model_folder import write_controlnet_folder
from t2vz.video_io import write_video
from weights_convert.__main__ import main as convert_main

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# the tiny VAE downsamples by 2: so does this ControlNet's control embedding
TINY_CONTROLNET = ControlNetConfig.from_unet(TINY_UNET, conditioning_embedding_out_channels=(8, 16))
SMALL = ["sampler.num_inference_steps=3", "output.progress=false", "output.formats=[mp4]"]


def compose_config(name: str, overrides: list[str], hydra: bool = False):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(name, overrides=overrides, return_hydra_config=hydra)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A single-file checkpoint (a DreamBooth fine-tune has this form) converted by the CLI, a ControlNet folder
    for it, an InstructPix2Pix folder, and a control video (a white square moving right on black, 4 frames)."""
    root = tmp_path_factory.mktemp("models")
    ckpt = write_checkpoint(tiny_ldm_checkpoint(ema=True), root / "dreambooth.ckpt")
    assert convert_main([str(ckpt), str(root / "sd")]) == 0
    torch.manual_seed(0)
    controlnet = ControlNet(TINY_CONTROLNET)
    with torch.no_grad():  # move the zero convolutions off zero, so that the control changes the frames
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cn = write_controlnet_folder(root / "cn", controlnet.state_dict(),
                                 {"controlnet": dataclasses.asdict(TINY_CONTROLNET)})
    ip2p, _ = tiny_instruct_pix2pix_folder(root / "ip2p")
    frames = torch.zeros(4, 32, 32, 3)
    for k in range(4):
        frames[k, 8:20, 4 + 3 * k : 16 + 3 * k] = 1.0
    video = write_video(root / "square.gif", frames)
    return dict(sd=root / "sd", cn=cn, ip2p=ip2p, video=video, frames=frames)


def run_sweep(script: str, sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DISABLE_GIT": "true", "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(REPO / "experiments" / script), "-m", *SMALL, f"hydra.sweep.dir={sweep_dir}",
            *overrides]
    return subprocess.run(args, cwd=sweep_dir.parent, env=env, text=True, capture_output=True, timeout=600)


def test_declared_sweeps_compose_and_values_are_checked():
    for name, experiment, key in (("control_experiment", "control/ablate_scale", "control.conditioning_scale"),
                                  ("instruct_experiment", "instruct/ablate_image_guidance",
                                   "sampler.image_guidance_scale")):
        cfg = compose_config(name, [f"+experiment={experiment}"], hydra=True)
        params = cfg.hydra.sweeper.params
        assert key in params and len(params[key].split(",")) >= 4 and len(params["seed"].split(",")) >= 3
    task_checks = [
        (CONTROL_VIDEO, "control_experiment", [], r"missing prompt, model, controlnet, control.video; give prompt="),
        (INSTRUCT_VIDEO, "instruct_experiment", ["instruction=x"], r"missing model, source.video; give model=\.\.\."),
        (CONTROL_VIDEO, "control_experiment", ["prompt=p", "model=m", "controlnet=c", "control.video=v",
                                               "control.detector=sobel"], "control.detector='sobel' is not one of"),
        (CONTROL_VIDEO, "control_experiment", ["prompt=p", "model=m", "controlnet=c", "control.video=v",
                                               "control.low_threshold=300"], "low_threshold=300.0 and control.high"),
        (INSTRUCT_VIDEO, "instruct_experiment", ["instruction=x", "model=m", "source.video=v", "source.resolution=500"],
         r"source.resolution=500 must be a multiple of 8"),
        (INSTRUCT_VIDEO, "instruct_experiment", ["instruction=x", "model=m", "source.video=v",
                                                 "sampler.image_guidance_scale=-1"], r"image_guidance_scale=-1.0"),
        (INSTRUCT_VIDEO, "instruct_experiment", ["instruction=x", "model=m", "source.video=v", "cross_frame=all"],
         r"cross_frame='all' is not one of"),
    ]
    for task, name, overrides, match in task_checks:
        with pytest.raises(ValueError, match=match):
            task.to_config(compose_config(name, overrides))


def test_canny_control_maps_follow_the_square(models):
    config = t2vz.experiment.conditional_runs.ControlConfig(video=str(models["video"]), detector="canny")
    edges = control_maps(config)
    assert edges.shape == (4, 32, 32, 3)
    for k in range(4):  # the square's left side moves 3 px a frame; Canny marks the column left of the step
        assert edges[k, 12, 3 + 3 * k, 0] == 1 and edges[k, 12, :3 + 3 * k, 0].sum() == 0
    short = dataclasses.replace(config, num_frames=9)
    with pytest.raises(ValueError, match=r"control.num_frames=9 but .*square.gif has 4 frames"):
        control_maps(short)


@torch.no_grad()
def test_converted_single_file_checkpoint_drives_controlvideo(models):
    """A DreamBooth-style single file, converted, drives ControlVideo like any SD 1.5-shaped model."""
    pipe = ControlVideo.from_pretrained(models["sd"], controlnet=models["cn"])
    frames = pipe("a sks dog", control=models["frames"], num_inference_steps=2, progress=False,
                  generator=torch.Generator().manual_seed(0))
    assert frames.shape == (4, 32, 32, 3) and torch.isfinite(frames).all()


@torch.no_grad()
def test_converted_instruct_pix2pix_single_file_drives_the_editor(models, tmp_path):
    """An InstructPix2Pix single file is recognised by its UNet's 8 input channels and drives the editor."""
    ckpt = write_checkpoint(tiny_ldm_checkpoint(unet_cfg=dataclasses.replace(TINY_UNET, in_channels=8)),
                            tmp_path / "ip2p.safetensors")
    assert convert_main([str(ckpt), str(tmp_path / "ip2p")]) == 0
    edit = VideoInstructPix2Pix.from_pretrained(tmp_path / "ip2p")
    assert edit.sd.config["variant"] == "instruct-pix2pix"
    frames = edit("make it snowy", video=models["frames"], num_inference_steps=2, progress=False,
                  generator=torch.Generator().manual_seed(0))
    assert frames.shape == (4, 32, 32, 3) and torch.isfinite(frames).all()
    with pytest.raises(ValueError, match=r"in_channels=4 .*needs an InstructPix2Pix UNet"):
        VideoInstructPix2Pix.from_pretrained(models["sd"])


def test_control_sweep_runs_and_logs_to_wandb_offline(models, tmp_path):
    from wandb_records import read_offline_run

    sweep = tmp_path / "control"
    proc = run_sweep("control_video.py", sweep, "prompt=a dog", f"model={models['sd']}", f"controlnet={models['cn']}",
                     f"control.video={models['video']}", "control.detector=canny",
                     "control.conditioning_scale=0.0,1.0", "chunk_size=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")]
    assert [r["status"] for r in records] == ["ok", "ok"], records
    for job, record in zip(("0", "1"), records):
        assert {"video.mp4", "video_sheet.png", "frames.npz", "config.yaml", "run.json"} <= {
            p.name for p in (sweep / job).iterdir()}
        logged = read_offline_run(sweep / job)
        assert logged["config"]["name"] == "control_video"
        assert logged["config"]["control"]["detector"] == "canny"
        assert logged["summary"]["warp_error"] == pytest.approx(record["warp_error"])
    assert (sweep / "summary.csv").is_file()
    frames = [json.loads((sweep / job / "run.json").read_text())["frames"] for job in ("0", "1")]
    assert frames == [[4, 32, 32, 3]] * 2


def test_instruct_sweep_runs_and_a_bad_job_fails_alone(models, tmp_path):
    from wandb_records import read_offline_run

    sweep = tmp_path / "instruct"
    proc = run_sweep("instruct_video.py", sweep, "instruction=make it snowy", f"model={models['ip2p']}",
                     f"source.video={models['video']},{tmp_path / 'missing.mp4'}", "source.resolution=24",
                     "source.size_multiple=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok, failed = (json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1"))
    assert ok["status"] == "ok" and json.loads((sweep / "0" / "run.json").read_text())["frames"] == [4, 24, 24, 3]
    assert read_offline_run(sweep / "0")["config"]["name"] == "instruct_video"
    assert failed["status"] == "failed" and "cannot read" in failed["error"] and "missing.mp4" in failed["error"]
    assert "job 1 failed: cannot read" in proc.stderr


def test_help_lists_the_required_keys():
    for script, keys in (("control_video.py", ["controlnet=...", "control.video=...", "control.detector=none"]),
                         ("instruct_video.py", ["instruction=...", "source.video=...",
                                                "sampler.image_guidance_scale=1.5"])):
        out = subprocess.run([sys.executable, str(REPO / "experiments" / script), "--help"], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert out.returncode == 0, out.stderr
        for key in keys:
            assert key in out.stdout, (key, out.stdout[:2000])

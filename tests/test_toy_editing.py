"""The toy world's moving-object videos, the judge's background and object-motion readings, and the editing
experiment (experiments/toy_editing.py) end to end at a few steps."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from t2vz.toyworld.judge import background_kind, object_motion_error, object_track
from t2vz.toyworld.world import BACKGROUNDS, render_video, sample_scene

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_moving_object_video_is_judged_as_rendered(background):
    scene = sample_scene(np.random.default_rng(3), seed=3, background=background, things=[("blue", "square")],
                         allow_held_out=True)
    scene = dataclasses.replace(scene, things=(dataclasses.replace(scene.things[0], cx=14.0),))
    video = render_video(scene, 6, (3.0, 1.0))
    assert video.shape == (6, 64, 64, 3) and video.dtype == np.uint8
    steps = np.diff(object_track(video, "blue"), axis=0)  # (dy, dx) per frame
    np.testing.assert_allclose(steps, np.tile([1.0, 3.0], (5, 1)), atol=0.35)
    assert object_motion_error(video, "blue", (3.0, 1.0)) < 0.35
    assert object_motion_error(video, "blue", (0.0, 0.0)) > 3.0
    assert {background_kind(frame) for frame in video} == {background}
    assert np.isnan(object_track(video, "red")).all() and np.isnan(object_motion_error(video, "red", (3.0, 1.0)))


def test_render_video_refuses_a_bad_frame_count():
    scene = sample_scene(np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_frames=0 must be an integer >= 1"):
        render_video(scene, 0, (1.0, 0.0))


def run_job(tmp_path: Path, *overrides: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = tmp_path / "job"
    result = subprocess.run([sys.executable, str(ROOT / "experiments/toy_editing.py"), *overrides,
                             "num_inference_steps=4", f"hydra.run.dir={out}", f"cache_dir={tmp_path / 'cache'}"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "frames.png").is_file() and (out / "source.png").is_file()
    return json.loads((out / "metrics.json").read_text())


def test_image_to_video_job_reports_frame_1_and_the_judge(tmp_path):
    metrics = run_job(tmp_path, "task=image_to_video", "seed=1")
    assert metrics["status"] == "ok" and "seed=1" in metrics["overrides"]
    assert 0 < metrics["vae_round_trip_error"] <= metrics["first_frame_error"] + 1.0
    for key in ("text_colour_ok", "text_shape_ok", "picture_colour_ok", "motion_error", "first_frame_psnr"):
        assert np.isfinite(metrics[key]), key


def test_tune_a_video_edit_job_tunes_once_per_seed(tmp_path):
    first = run_job(tmp_path, "task=edit", "method=tune_a_video", "edit=background", "tune.steps=2")
    assert first["tune_s"] > 0 and first["peak_rss_mib"] > 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    again = run_job(tmp_path, "task=edit", "method=tune_a_video", "edit=shape", "tune.steps=2")
    assert again["tune_s"] is None  # served by the cache: NaN recorded as null
    for key in ("edit_ok", "colour_ok", "shape_ok", "background_ok", "all_ok"):
        assert 0.0 <= again[key] <= 1.0, key


def test_bad_choice_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "experiments/toy_editing.py"), "method=magic",
                             f"hydra.run.dir={tmp_path / 'x'}"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "toy_editing: error: method='magic' is not one of tune_a_video, inversion, t2v_zero" in result.stderr

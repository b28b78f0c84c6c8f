"""Sweeps resume by default: a point whose folder holds complete outputs of the same config is skipped, its files
untouched; a killed sweep rerun with the same command runs only the rest; `resume=false` runs every point again;
each point keeps one W&B run (its id derives from the sweep folder and the point)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sweep_files import FINISHED, action, mtimes, summary_rows as rows, wandb_ids
from t2vz.experiment.resume import config_sha256, incomplete_reason, point_overrides, point_run_id

REPO = Path(__file__).resolve().parents[1]
TOY = ["model=toyworld", "prompt=a red circle on grass", "video.num_frames=3", "sampler.num_inference_steps=6",
       "metrics.clip=null", "output.progress=false", "output.formats=[mp4]"]


def sweep_args(sweep: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "experiments" / "run.py"), "-m", *TOY, f"hydra.sweep.dir={sweep}", *overrides]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
       "WANDB_DISABLE_GIT": "true", "PYTHONPATH": str(REPO)}


def run_sweep(sweep: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(sweep_args(sweep, *overrides), cwd=sweep.parent, env=ENV, text=True, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------------- the pieces, no model
def test_the_hash_ignores_what_does_not_change_the_outputs():
    cfg = OmegaConf.create({"seed": 0, "resume": True, "logger": {"mode": "offline"}, "output": {"progress": True,
                                                                                                  "fps": 4}})
    same = OmegaConf.create({"seed": 0, "resume": False, "logger": {"mode": "online"}, "output": {"progress": False,
                                                                                                   "fps": 4}})
    assert config_sha256(cfg) == config_sha256(same)
    assert config_sha256(cfg) != config_sha256(OmegaConf.merge(cfg, {"seed": 1}))
    assert config_sha256(cfg) != config_sha256(OmegaConf.merge(cfg, {"output": {"fps": 8}}))


def test_a_points_run_id_is_stable_and_its_own(tmp_path):
    sweep = tmp_path / "sweep"
    a = point_run_id(sweep / "0", sweep, ["seed=0", "method.t0=3"])
    assert a == point_run_id(sweep / "0", sweep, ["method.t0=3", "seed=0", "resume=false", "logger.mode=offline"])
    assert a.startswith("0-") and len(a) == 14
    assert a != point_run_id(sweep / "0", sweep, ["seed=1", "method.t0=3"])  # another point
    assert a != point_run_id(sweep / "0", tmp_path / "other", ["seed=0", "method.t0=3"])  # another sweep
    assert point_overrides(["+logger=offline", "resume=false", "seed=2"]) == ["seed=2"]


def test_what_makes_a_point_incomplete(tmp_path):
    (tmp_path / "video.mp4").write_bytes(b"x")
    assert incomplete_reason(tmp_path, "abc") == "no readable metrics.json"
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "failed"}))
    assert incomplete_reason(tmp_path, "abc") == "its last run ended 'failed'"
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "ok"}))
    assert incomplete_reason(tmp_path, "abc") == "no readable run.json"
    (tmp_path / "run.json").write_text(json.dumps({"config_sha256": "abc", "outputs": ["video.mp4", "config.yaml"]}))
    assert incomplete_reason(tmp_path, "abd") == "its config changed"
    assert incomplete_reason(tmp_path, "abc") == "config.yaml missing"
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert incomplete_reason(tmp_path, "abc") is None
    assert incomplete_reason(tmp_path, "abc", also=("frames.npz",)) == "frames.npz missing"


# ------------------------------------------------------------------------------------------------- local sweeps
def test_a_sweep_killed_midway_reruns_only_the_rest(tmp_path):
    sweep = tmp_path / "killed"
    proc = subprocess.Popen(sweep_args(sweep, "seed=0,1,2,3"), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while action(sweep / "1") != "ran" and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and everything it started
    finally:
        proc.wait(timeout=60)
    assert action(sweep / "1") == "ran" and not (sweep / "summary.csv").exists()
    done = [job for job in ("0", "1", "2", "3") if action(sweep / job) == "ran"]
    assert len(done) < 4, "the sweep finished before it was killed"
    before = {job: mtimes(sweep / job) for job in done}
    ids = {job: wandb_ids(sweep / job) for job in done}

    out = run_sweep(sweep, "seed=0,1,2,3").stdout  # the same command
    n = len(done)
    assert f"4 points: {4 - n} ran, {n} skipped as complete already, 0 failed" in out
    assert [r["action"] for r in rows(sweep)] == ["skipped"] * n + ["ran"] * (4 - n)
    assert all(r["status"] == "ok" for r in rows(sweep))
    for job in done:
        assert mtimes(sweep / job) == before[job]  # untouched
        assert wandb_ids(sweep / job) == ids[job] and len(ids[job]) == 1  # no second W&B run
        assert f"t2vz: job {job} skipped: complete already" in out
    all_ids = [i for job in ("0", "1", "2", "3") for i in set(wandb_ids(sweep / job))]
    assert len(all_ids) == len(set(all_ids)) == 4


def test_a_deleted_output_a_changed_point_and_resume_false(tmp_path):
    sweep = tmp_path / "sweep"
    run_sweep(sweep, "method.motion_strength=0,8")
    first = {job: mtimes(sweep / job) for job in ("0", "1")}
    first_ids = {job: wandb_ids(sweep / job) for job in ("0", "1")}

    (sweep / "1" / "video.mp4").unlink()  # a partial point
    out = run_sweep(sweep, "method.motion_strength=0,8").stdout
    assert "t2vz: job 1 runs (again): video.mp4 missing" in out
    assert "2 points: 1 ran, 1 skipped as complete already, 0 failed" in out
    assert mtimes(sweep / "0") == first["0"] and (sweep / "1" / "video.mp4").is_file()
    assert set(wandb_ids(sweep / "1")) == set(first_ids["1"]) and len(wandb_ids(sweep / "1")) == 2  # continued

    out = run_sweep(sweep, "method.motion_strength=0,16").stdout  # point 1 is another config now
    assert "t2vz: job 1 runs (again): its config changed" in out
    assert "2 points: 1 ran, 1 skipped as complete already, 0 failed" in out
    assert "method.motion_strength=16" in json.loads((sweep / "1" / "metrics.json").read_text())["overrides"]
    assert len(set(wandb_ids(sweep / "1"))) == 2  # another point, another W&B run

    out = run_sweep(sweep, "method.motion_strength=0,16", "resume=false").stdout  # forced
    assert "2 points: 2 ran, 0 skipped as complete already, 0 failed" in out
    assert all(mtimes(sweep / "0")[name] > first["0"][name] for name in FINISHED)
    assert set(wandb_ids(sweep / "0")) == set(first_ids["0"])  # the same W&B run, continued


def test_a_failed_point_runs_again(tmp_path):
    sweep = tmp_path / "failed"
    proc = subprocess.run(sweep_args(sweep, "video.num_frames=3,0"), cwd=tmp_path, env=ENV, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["status"] for r in rows(sweep)] == ["ok", "failed"]
    out = run_sweep(sweep, "video.num_frames=3,0").stdout
    assert "t2vz: job 1 runs (again): its last run ended 'failed'" in out
    assert "2 points: 0 ran, 1 skipped as complete already, 1 failed" in out


@pytest.mark.parametrize("value", ["maybe", "[true]"])
def test_resume_must_be_a_boolean(tmp_path, value):
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), *TOY, f"resume={value}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=ENV, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode != 0 and "resume" in proc.stderr

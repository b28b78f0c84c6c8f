"""Sweeps beyond the basic launcher: joblib (parallel processes) and submitit's local executor run a two-point
sweep of experiments/run.py; the SLURM configs compose, with one GPU per job or none (tests/test_slurm.py submits
to a real Slurm)."""
from __future__ import annotations

import csv

import pytest
from test_experiments import compose_experiment, run_sweep, tiny_model  # noqa: F401  (tiny_model: a fixture)

LAUNCHERS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher",
                       ["hydra/launcher=local_gpu", "hydra.launcher.gpus_per_node=0"]),  # CPU-only here
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_point_sweep(tiny_model, tmp_path, launcher):  # noqa: F811
    module, overrides = LAUNCHERS[launcher]
    pytest.importorskip(module, reason=f"the {launcher} launcher is not installed (pip install -e .[cluster])")
    sweep = tmp_path / launcher
    proc = run_sweep(tiny_model, sweep, "logger=disabled", "method.motion_strength=0,64", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["method.motion_strength"], r["status"]) for r in rows] == [("0", "ok"), ("64", "ok")]
    assert rows[0]["warp_error"] != rows[1]["warp_error"]  # the swept value reached each job
    assert all((sweep / job / "video.mp4").is_file() for job in ("0", "1"))


@pytest.mark.parametrize("config, gpus, cpus", [("slurm_gpu", 1, 8), ("slurm_cpu", None, 8)])
def test_slurm_configs_ask_their_resources_and_requeue_on_timeouts(config, gpus, cpus):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    cfg = compose_experiment(["prompt=p", "model=m", f"hydra/launcher={config}", "hydra.launcher.partition=part"],
                             hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.cpus_per_task, launcher.tasks_per_node, launcher.partition) == (
        gpus, cpus, 1, "part")
    assert launcher.max_num_timeout == 3  # a job reaching its time limit is requeued (submitit's default: never)

"""Sweeps on a real Slurm: experiments/run.py submits through Hydra's submitit launcher (`hydra/launcher=slurm_cpu`) to
a one-node cluster started for these tests (tests/slurm_cluster.py). A full sweep, a failing point, a point requeued
while it runs (`scontrol requeue`) and a sweep cancelled mid-way (`scancel`) then resumed by the same command; each
point keeps exactly one W&B run (offline) through all of it. Skipped, with the reason, where Debian's slurmctld,
slurmd, slurm-client and munge are not installed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from slurm_cluster import missing_reason, start_cluster, stop_cluster
from sweep_files import FINISHED, action, summary_rows as summary, wandb_ids

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))
TOY = ["model=toyworld", "prompt=a red circle on grass", "video.num_frames=3", "sampler.num_inference_steps=6",
       "metrics.clip=null", "output.progress=false", "output.formats=[mp4]"]
LAUNCHER = ["hydra/launcher=slurm_cpu", "hydra.launcher.partition=t2vz", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    stop_cluster(cluster)


def sweep_args(sweep: Path, *overrides: str, parallel: int = 2) -> list[str]:
    return [sys.executable, str(REPO / "experiments" / "run.py"), "-m", *TOY, *LAUNCHER,
            f"hydra.launcher.array_parallelism={parallel}", f"hydra.sweep.dir={sweep}", *overrides]


def job_env(slurm) -> dict:
    return {**slurm.env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_DISABLE_GIT": "true", "PYTHONPATH": str(REPO)}


def run_sweep(slurm, sweep: Path, *overrides: str, parallel: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_args(sweep, *overrides, parallel=parallel), cwd=sweep.parent, env=job_env(slurm),
                          text=True, capture_output=True, timeout=600)


def start_sweep(slurm, sweep: Path, *overrides: str, parallel: int = 2) -> subprocess.Popen:
    return subprocess.Popen(sweep_args(sweep, *overrides, parallel=parallel), cwd=sweep.parent, env=job_env(slurm),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(condition, what: str, slurm, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; jobs: {slurm.jobs()}\n{slurm.logs()}")


def job_processes(slurm_job: str) -> list[int]:
    """The pids of a Slurm array task's python (`submitit.core._submit`), found through their environment."""
    array, task = slurm_job.split("_")
    wanted = {f"SLURM_ARRAY_JOB_ID={array}", f"SLURM_ARRAY_TASK_ID={task}"}
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"submitit.core._submit" in (proc / "cmdline").read_bytes() and \
                    wanted <= set((proc / "environ").read_bytes().decode(errors="replace").split("\0")):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


@contextmanager
def held(slurm_job: str):
    """Keep a running job's python stopped until Slurm has killed it. Slurm ends a job it requeues or cancels with
    SIGCONT and SIGTERM, then SIGKILL some seconds later; submitit lets the job run on through SIGTERM, so a point
    with only a few seconds left would finish in that gap (and then rightly be skipped when it starts again).
    SIGSTOP, sent again every 10 ms against Slurm's SIGCONT, leaves it no such gap whatever the CPU's speed."""
    pids = job_processes(slurm_job)
    assert pids, f"no running process of job {slurm_job}"
    gone = threading.Event()

    def keep_stopped():
        alive = set(pids)
        while alive and not gone.wait(0.01):
            for pid in list(alive):
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    alive.discard(pid)
        gone.set()

    thread = threading.Thread(target=keep_stopped, daemon=True)
    thread.start()
    try:
        yield
        assert gone.wait(120), f"job {slurm_job} was not killed within 120 s"
    finally:
        gone.set()
        thread.join()
        for pid in pids:  # never leave a process stopped behind
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


def slurm_job_of(job: Path) -> str:
    return json.loads((job / "job.json").read_text())["slurm_job"]


def test_a_sweep_completes_every_point_with_one_wandb_run_each(slurm, tmp_path):
    sweep = tmp_path / "lambda"
    proc = run_sweep(slurm, sweep, "method.motion_strength=0,8,16")
    assert proc.returncode == 0, proc.stderr[-3000:] + slurm.logs()
    rows = summary(sweep)
    assert [(r["method.motion_strength"], r["status"], r["action"]) for r in rows] == [
        ("0", "ok", "ran"), ("8", "ok", "ran"), ("16", "ok", "ran")]
    assert all(r["slurm_job"] and r["restarts"] == "0" for r in rows)  # each ran as its own Slurm job
    assert len({r["slurm_job"] for r in rows}) == 3
    ids = []
    for job in ("0", "1", "2"):
        assert all((sweep / job / name).is_file() for name in FINISHED)
        ids += wandb_ids(sweep / job)
    assert len(ids) == len(set(ids)) == 3, ids
    assert "3 points: 3 ran, 0 skipped as complete already, 0 failed" in proc.stdout


def test_a_failing_point_is_reported_and_the_others_complete(slurm, tmp_path):
    sweep = tmp_path / "failing"
    proc = run_sweep(slurm, sweep, "video.num_frames=3,0,2")
    assert proc.returncode == 0, proc.stderr[-3000:] + slurm.logs()
    rows = summary(sweep)
    assert [(r["video.num_frames"], r["status"], r["action"]) for r in rows] == [
        ("3", "ok", "ran"), ("0", "failed", "failed"), ("2", "ok", "ran")]
    assert "video.num_frames=0" in rows[1]["error"]
    assert "3 points: 2 ran, 0 skipped as complete already, 1 failed" in proc.stdout
    assert not (sweep / "1" / "video.mp4").exists() and (sweep / "2" / "video.mp4").is_file()


def test_a_point_requeued_while_it_runs_restarts_and_finishes_with_one_wandb_run(slurm, tmp_path):
    sweep = tmp_path / "requeue"
    proc = start_sweep(slurm, sweep, "method.motion_strength=0,8", "sampler.num_inference_steps=200",
                       "video.num_frames=4")
    try:
        job = sweep / "0"
        wait_for(lambda: action(job) == "running" and wandb_ids(job), "point 0 to run", slurm)
        with held(slurm_job_of(job)):
            assert action(job) == "running"  # held before it finished
            slurm.run("scontrol", "requeue", slurm_job_of(job))
        out, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:] + slurm.logs()
    record = metrics(job)
    assert record["status"] == "ok" and record["restarts"] == 1, record
    assert json.loads((job / "run.json").read_text())["restarts"] == 1
    assert metrics(sweep / "1")["restarts"] == 0
    ids = wandb_ids(job)
    assert len(ids) == 2 and len(set(ids)) == 1, ids  # two attempts, one W&B run
    assert set(ids).isdisjoint(wandb_ids(sweep / "1"))
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*.err"))
    assert "restarted by Slurm (restart 1 of job" in logs


def test_a_cancelled_sweep_resumes_where_it_stopped(slurm, tmp_path):
    sweep = tmp_path / "cancel"
    points = ("sampler.num_inference_steps=6,200,6",)  # point 1 runs long enough to be cancelled while it runs
    proc = start_sweep(slurm, sweep, *points, parallel=1)  # one point at a time
    try:
        wait_for(lambda: action(sweep / "0") == "ran" and action(sweep / "1") == "running", "point 1 to run", slurm)
        array = slurm_job_of(sweep / "0").split("_")[0]
        with held(slurm_job_of(sweep / "1")):
            assert action(sweep / "1") == "running"  # held before it finished
            slurm.run("scancel", array)
        out, _ = proc.communicate(timeout=300)  # the launcher sees the cancelled jobs and gives up
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert not (sweep / "1" / "metrics.json").exists() and not (sweep / "2" / "metrics.json").exists()
    finished = {name: (sweep / "0" / name).stat().st_mtime_ns for name in FINISHED}
    first_ids = wandb_ids(sweep / "0")

    proc = run_sweep(slurm, sweep, *points, parallel=1)  # the same command
    assert proc.returncode == 0, proc.stderr[-3000:] + slurm.logs()
    assert "3 points: 2 ran, 1 skipped as complete already, 0 failed" in proc.stdout
    assert [(r["status"], r["action"]) for r in summary(sweep)] == [("ok", "skipped"), ("ok", "ran"), ("ok", "ran")]
    assert {name: (sweep / "0" / name).stat().st_mtime_ns for name in FINISHED} == finished  # untouched
    assert wandb_ids(sweep / "0") == first_ids and len(first_ids) == 1  # no second run for the skipped point
    assert len(set(wandb_ids(sweep / "1"))) == 1  # its cancelled attempt and its rerun: one W&B run
    all_ids = [i for job in ("0", "1", "2") for i in set(wandb_ids(sweep / job))]
    assert len(all_ids) == len(set(all_ids)) == 3

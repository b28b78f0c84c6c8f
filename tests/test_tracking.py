"""t2vz.experiment.tracking: offline W&B runs, read back from their `.wandb` files; no-op trackers; the multirun summary.

wandb 0.31 has no Python reader of `.wandb` files (the old `wandb.sdk.internal.datastore` went with the move to
the Go `wandb-core`), so `read_records` below reads the format itself: a 7-byte header (":W&B", magic 0xBEE1,
version 0), then LevelDB-log records in 32 KiB blocks (crc32 of type byte + data, uint16 length, type FULL /
FIRST / MIDDLE / LAST), each payload one `wandb.proto.wandb_internal_pb2.Record`.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import wandb
from omegaconf import OmegaConf

from t2vz.experiment.tracking import LoggerConfig, MultirunSummary, Tracker, sweep_group
from wandb_records import read_run
from t2vz.video_io import write_contact_sheet, write_video

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline, silent, every folder it writes under tmp_path; nothing can reach the network."""
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(key, raising=False)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
           "WANDB_DISABLE_CODE": "true", "WANDB_DIR": tmp_path / "wandb_dir", "WANDB_CACHE_DIR": tmp_path / "cache",
           "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_DATA_DIR": tmp_path / "data"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    yield tmp_path
    wandb.teardown()  # the next test starts a fresh wandb-core with its own environment


def small_video(folder: Path) -> tuple[Path, Path]:
    frames = torch.rand(3, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    return write_video(folder / "video.mp4", frames, fps=4), write_contact_sheet(folder / "video_sheet.png", frames)


def test_offline_run_holds_config_metrics_video_and_image(offline, monkeypatch):
    monkeypatch.setattr(wandb, "login", lambda *a, **k: pytest.fail("an offline run logs in"))
    job = offline / "job"
    video, sheet = small_video(job)
    config = {"prompt": "a horse", "seed": 7, "method": {"t0": 44, "direction": [1.0, 0.5]}}
    with Tracker(LoggerConfig(tags=["test"]), job, config, name="horse", info={"wall_s": 1.5}) as tracker:
        tracker.log_metrics({"clip_score": 0.25, "frame_diff": 0.125})
        tracker.log_video(video)
        tracker.log_image("sheet", sheet)
        run_dir, run_path = tracker.run_dir, tracker.run_path
    assert run_dir.parent == job / "wandb" and run_dir.name.startswith("offline-run-")
    assert run_path.endswith(run_dir.name.rsplit("-", 1)[1]) and tracker.run is None  # finished
    assert (tracker.run_dir, tracker.run_path) == (run_dir, run_path)  # still there after finish
    run = read_run(run_dir)
    assert run["run"].display_name == "horse" and list(run["run"].tags) == ["test"]
    assert run["run"].job_type == "generate" and run["run"].run_group == ""  # a single run: no group
    assert {k: run["config"][k] for k in config} == config and run["config"]["run"] == {"wall_s": 1.5}
    assert run["summary"]["clip_score"] == 0.25 and run["summary"]["frame_diff"] == 0.125
    assert {"clip_score": 0.25, "frame_diff": 0.125}.items() <= run["history"][0].items()
    [media] = [step["video"] for step in run["history"] if "video" in step]
    assert media["_type"] == "video-file" and media["path"] in run["files"]
    assert (run_dir / "files" / media["path"]).read_bytes() == video.read_bytes()  # logged as is, not re-encoded
    [image] = [step["sheet"] for step in run["history"] if "sheet" in step]
    assert image["_type"] == "image-file" and (run_dir / "files" / image["path"]).is_file()
    assert run["exit_code"] == 0


def test_failed_job_marks_the_run_failed(offline):
    with pytest.raises(SystemExit), Tracker(LoggerConfig(mode="offline"), offline, {}) as tracker:
        run_dir = tracker.run_dir
        sys.exit(2)
    assert read_run(run_dir)["exit_code"] == 2
    with pytest.raises(KeyError), Tracker(LoggerConfig(), offline, {}) as tracker:  # never swallowed
        run_dir = tracker.run_dir
        raise KeyError("boom")
    assert read_run(run_dir)["exit_code"] == 1
    with Tracker(LoggerConfig(), offline, {}) as tracker:  # a job that catches its own error
        tracker.fail("ValueError: t0 >= t1")
    run = read_run(tracker.run_dir)
    assert run["exit_code"] == 1 and run["summary"]["error"] == "ValueError: t0 >= t1"


@pytest.mark.parametrize("config, env_mode", [(LoggerConfig(mode="disabled"), "online"),
                                              (LoggerConfig(enabled=False), "online"), ({"enabled": False}, "online"),
                                              (LoggerConfig(), "disabled")])
def test_disabled_tracker_is_a_no_op(offline, monkeypatch, config, env_mode):
    monkeypatch.setenv("WANDB_MODE", env_mode)
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init called by a disabled tracker"))
    job = offline / "job"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Tracker(config, job, {"seed": 0}) as tracker:
            tracker.log_metrics({"x": 1.0})
            tracker.log_video(job / "video.mp4")  # not even there: nothing looks at it
            tracker.log_image("sheet", job / "video_sheet.png")
            tracker.fail("an error")
            assert tracker.run_path is None and tracker.run_dir is None
    assert not job.exists() and not (offline / "wandb_dir").exists()


def test_invalid_mode_names_it():
    with pytest.raises(ValueError, match=r"logger.mode='offlne'.*online, offline, disabled"):
        LoggerConfig(mode="offlne")
    with pytest.raises(ValueError, match="'bogus'"):
        Tracker({"mode": "bogus"}, ".", {})


@pytest.mark.parametrize("failure", ["init", "login"])
def test_wandb_failure_warns_once_and_the_job_goes_on(offline, monkeypatch, failure):
    def refuse(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    if failure == "init":  # e.g. no network
        monkeypatch.setattr(wandb, "init", refuse)
        mode, message = "offline", "starting the run failed.*ConnectionError: api.wandb.ai unreachable"
    else:  # online without a login: wandb.login(timeout=...) gave up (or no terminal to ask on)
        monkeypatch.setattr(wandb, "login", lambda *a, **k: False)
        monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init called without a login"))
        mode, message = "online", "starting the run failed.*no W&B login"
    job = offline / "job"
    video, sheet = small_video(job)
    with pytest.warns(RuntimeWarning, match=message) as caught:
        with Tracker(LoggerConfig(mode=mode), job, {"seed": 0}) as tracker:
            tracker.log_metrics({"x": 1.0})
            tracker.log_video(video)
            tracker.log_image("sheet", sheet)
            tracker.fail("an error")
            (job / "metrics.json").write_text("{}")  # local work goes on
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert tracker.run_path is None and (job / "metrics.json").is_file()


def write_job(folder: Path, metrics: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_multirun_summary_writes_csv_and_a_summary_run(offline):
    sweep = offline / "multirun" / "2026-01-02" / "03-04-05"
    write_job(sweep / "0", {"clip_score": 0.3, "overrides": ["method.t0=40", "prompt='a cat'"], "status": "ok"})
    write_job(sweep / "1", {"overrides": ["method.t0=41", "prompt='a cat'"], "status": "failed",
                            "error": "ValueError: t0 >= t1"})
    (sweep / "2" / ".hydra").mkdir(parents=True)  # a job that died before writing metrics.json
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- method.t0=42\n")
    config = OmegaConf.create({"logger": {"mode": "offline", "tags": ["sweep"]},
                               "hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": ["method.t0=40,41,42"]}}})
    MultirunSummary().on_multirun_end(config)

    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["method.t0"], r["prompt"], r["clip_score"], r["status"], r["error"]) for r in rows] == [
        ("0", "40", "a cat", "0.3", "ok", ""), ("1", "41", "a cat", "", "failed", "ValueError: t0 >= t1"),
        ("2", "42", "", "", "missing", "no metrics.json")]
    assert not [p for p in sweep.iterdir() if p.name.startswith(".summary.csv")]  # no temporary file left

    [run_dir] = (sweep / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert run["run"].job_type == "summary" and run["run"].run_group == "2026-01-02_03-04-05"
    assert run["config"]["sweep_overrides"] == ["method.t0=40,41,42"] and run["config"]["jobs"] == 3
    assert run["summary"]["jobs_ok"] == 1 and run["summary"]["jobs_failed"] == 2
    [table] = [step["jobs"] for step in run["history"] if "jobs" in step]
    assert table["_type"] == "table-file" and table["path"] in run["files"]
    logged = json.loads((run_dir / "files" / table["path"]).read_text())
    assert logged["columns"] == ["job", "method.t0", "prompt", "clip_score", "status", "error"]
    assert logged["data"] == [["0", 40, "a cat", 0.3, "ok", None], ["1", 41, "a cat", None, "failed",
                                                                    "ValueError: t0 >= t1"],
                              ["2", 42, None, None, "missing", "no metrics.json"]]


def test_a_rerun_sweep_counts_what_it_skipped_and_continues_its_summary_run(offline, capsys):
    from t2vz.experiment.resume import summary_run_id

    sweep = offline / "sweeps" / "lambda"
    for job, action in (("0", "skipped"), ("1", "ran"), ("2", "failed")):
        write_job(sweep / job, {"overrides": [f"method.motion_strength={job}"],
                                "status": "failed" if action == "failed" else "ok"})
        (sweep / job / "job.json").write_text(json.dumps({"action": action}))
    config = OmegaConf.create({"logger": {"mode": "offline"}, "hydra": {"sweep": {"dir": str(sweep)}}})
    MultirunSummary().on_multirun_end(config)
    MultirunSummary().on_multirun_end(config)  # the sweep rerun: the same summary run, continued
    assert "3 points: 1 ran, 1 skipped as complete already, 1 failed" in capsys.readouterr().out
    assert [r["action"] for r in csv.DictReader((sweep / "summary.csv").open())] == ["skipped", "ran", "failed"]
    runs = sorted((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {f.name for p in runs for f in p.glob("run-*.wandb")} == {
        f"run-{summary_run_id(sweep)}.wandb"}
    summary = read_run(runs[-1])["summary"]
    assert (summary["jobs_ran"], summary["jobs_resumed"], summary["jobs_failed"]) == (1, 1, 1)


APP = '''
import json, sys
from dataclasses import dataclass, field
import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from t2vz.experiment.tracking import LoggerConfig, Tracker

@dataclass
class Config:
    x: int = 0
    logger: LoggerConfig = field(default_factory=LoggerConfig)

ConfigStore.instance().store(name="app", node=Config)

@hydra.main(version_base="1.3", config_path=None, config_name="app")
def main(cfg):
    out = HydraConfig.get().runtime.output_dir
    with Tracker(cfg.logger, out, cfg, name=f"x={cfg.x}") as tracker:
        tracker.log_metrics({"y": 2.0 * cfg.x})
        metrics = {"y": 2.0 * cfg.x, "overrides": list(HydraConfig.get().overrides.task), "status": "ok"}
        open(f"{out}/metrics.json", "w").write(json.dumps(metrics))

main()
'''


def test_two_point_sweep_shares_one_group(offline):
    """A real Hydra multirun: both jobs and the summary run land in the group named after the sweep folder."""
    (offline / "app.py").write_text(APP)
    sweep = offline / "sweeps" / "xs"
    result = subprocess.run(
        [sys.executable, "app.py", "-m", "x=1,2", f"hydra.sweep.dir={sweep}",
         "+hydra.callbacks.summary._target_=t2vz.experiment.tracking.MultirunSummary"],
        cwd=offline, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    runs = [read_run(d) for d in sorted(sweep.glob("**/wandb/offline-run-*"))]
    assert sorted(r["run"].job_type for r in runs) == ["generate", "generate", "summary"]
    assert {r["run"].run_group for r in runs} == {sweep_group(sweep)} == {"sweeps_xs"}
    assert sorted(r["summary"]["y"] for r in runs if "y" in r["summary"]) == [2.0, 4.0]
    assert (sweep / "summary.csv").read_text().splitlines()[1:] == ["0,1,2.0,ok,", "1,2,4.0,ok,"]


def test_multirun_summary_fails_a_sweep_whose_jobs_all_failed(offline, capsys):
    """All points failed: summary.csv is still written, then exit status 2 with one line naming it."""
    sweep = offline / "multirun" / "all-failed"
    for job in ("0", "1"):
        write_job(sweep / job, {"overrides": [f"seed={job}"], "status": "failed", "error": "bad"})
    config = OmegaConf.create({"logger": {"mode": "disabled"}, "hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(SystemExit) as exit_info:
        MultirunSummary().on_multirun_end(config)
    assert exit_info.value.code == 2
    assert (sweep / "summary.csv").is_file()
    assert "all 2 jobs of the sweep failed" in capsys.readouterr().err
    write_job(sweep / "2", {"overrides": ["seed=2"], "status": "ok"})  # one point done: the sweep is fine
    MultirunSummary().on_multirun_end(config)


def test_unreachable_wandb_switches_the_rest_of_the_run_to_offline(offline, monkeypatch):
    """An online run that cannot reach W&B: one warning, the run logged offline; a later run in the same process
    goes offline at once, without waiting for the server again and without a second warning."""
    import t2vz.experiment.tracking as tracking

    monkeypatch.setattr(tracking, "_unreachable", False)
    monkeypatch.setattr(wandb, "login", lambda *a, **k: True)
    real_init, modes = wandb.init, []

    def init(*args, mode=None, settings=None, **kwargs):
        modes.append((mode, settings.init_timeout))
        if mode == "online":
            raise wandb.errors.CommError("Timed out while retrying: dial tcp 127.0.0.1:9: connection refused")
        return real_init(*args, mode=mode, settings=settings, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    config = LoggerConfig(mode="online", init_timeout=2.5)
    with pytest.warns(RuntimeWarning, match=r"W&B could not be reached within logger.init_timeout=2.5 s "
                                            r"\(CommError: Timed out.*\); this and the following jobs log offline"):
        with Tracker(config, offline / "job0", {"seed": 0}) as first:
            first.log_metrics({"x": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        with Tracker(config, offline / "job1", {"seed": 1}) as second:
            second.log_metrics({"x": 2.0})
    assert modes == [("online", 2.5), ("offline", 2.5), ("offline", 2.5)]
    assert read_run(first.run_dir)["summary"]["x"] == 1.0 and read_run(second.run_dir)["summary"]["x"] == 2.0
    monkeypatch.setattr(tracking, "_unreachable", False)
    with Tracker(LoggerConfig(mode="online", on_unreachable="disabled"), offline / "job2", {}) as off:
        pass
    assert off.run_dir is None and modes[-1] == ("online", 15.0)  # the default timeout; then nothing logged


def test_logger_checks_its_fallback_and_timeout():
    with pytest.raises(ValueError, match="logger.on_unreachable='online' is not one of offline, disabled"):
        LoggerConfig(on_unreachable="online")
    for bad in (0, -1, float("inf"), True):
        with pytest.raises(ValueError, match="logger.init_timeout=.* must be a positive number of seconds"):
            LoggerConfig(init_timeout=bad)

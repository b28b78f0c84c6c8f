"""Sweeps that survive interruptions: a point already finished is skipped, a restarted one is known to be.

    point = Point(cfg, run_dir, also=("frames.npz",))   # cfg: the job's composed config (model defaults filled in)
    finished = point.finished()      # the point's metrics.json record if it is complete: the job skips it
    if finished is None:
        point.begin()                # job.json "running"; a stale metrics.json of an older config is removed
        ...                          # generate, then write_run(..., extra=point.run_info())
        point.end("ok")              # job.json "ran" (or "failed")

A point is **complete** when its folder holds `metrics.json` with status "ok", `run.json` whose `config_sha256`
equals the hash of the job's resolved config (`config_sha256`), and every file run.json lists in `outputs` (plus
`also`). Such a point is skipped unless `resume=false`; a missing, failed, partial (killed mid-way) or changed
point runs. A skipped point's files are not touched: only `job.json`, which says what the last invocation did with
the point (`ran`, `skipped`, `failed`, `not run` for a method that cannot run on the models given, or `running`
if it died), is rewritten. The hash leaves out what does not
change the outputs: `resume` itself, the `logger` group (where results are logged) and `output.progress`. It covers
the config, not the model's files: retrained weights under the same folder name need `resume=false`.

Under Slurm, `SLURM_RESTART_COUNT` (set when a job is requeued: preemption, a timeout, `scontrol requeue`) is
recorded as `restarts` with the Slurm job id, and the job says it restarted. The point's W&B run id
(`point_run_id`) derives from the sweep folder and the point's overrides, so a requeued, resumed or forced point
continues its one W&B run instead of opening another.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from ..video_io import write_text

JOB_FILE = "job.json"  # what the last invocation did with the point: ran / skipped / failed / running
NOT_HASHED = ("resume", "logger", "output.progress")  # keys that do not change a point's outputs
RAN, SKIPPED, FAILED, RUNNING, NOT_RUN = "ran", "skipped", "failed", "running", "not run"


def config_sha256(cfg) -> str:
    """sha256 of the resolved config as sorted JSON, without the `NOT_HASHED` keys."""
    tree = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    for key in NOT_HASHED:
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


def slurm_job() -> Optional[str]:
    """The Slurm job this process runs in: `ARRAY_ID_TASK_ID` for a job of an array, else the job id; None
    outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def restarts() -> int:
    """How often the scheduler restarted this job (Slurm's SLURM_RESTART_COUNT: requeues after preemption, a
    timeout or `scontrol requeue`); 0 outside Slurm."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def point_overrides(overrides: list[str]) -> list[str]:
    """A point's overrides, sorted, without those of `NOT_HASHED` keys (logging and resume choices do not make
    another point)."""
    def key(text: str) -> str:
        return text.split("=", 1)[0].lstrip("+~")

    return sorted(o for o in overrides if not any(key(o) == k or key(o).startswith(k + ".") for k in NOT_HASHED))


def point_run_id(run_dir: str | os.PathLike, sweep_dir: str | os.PathLike | None, overrides: list[str]) -> str:
    """The W&B run id of a point: its folder's name and 12 hex digits of sha256(sweep folder, the point's
    overrides) for a sweep job (the folder alone for a single run). Stable across reruns, requeues and
    offline-then-sync; W&B ids may hold letters, digits, - and _."""
    run_dir = Path(run_dir).resolve()
    where = str(Path(sweep_dir).resolve()) if sweep_dir is not None else str(run_dir)
    digest = hashlib.sha256("\n".join([where, *point_overrides(overrides)]).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", run_dir.name).strip("-")[:40]
    return f"{name}-{digest}" if name else digest


def summary_run_id(sweep_dir: str | os.PathLike) -> str:
    """The W&B run id of a sweep's summary run: one per sweep folder, continued when the sweep is rerun."""
    return "summary-" + hashlib.sha256(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:12]


def read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def recorded_number(record: dict, key: Optional[str]) -> float:
    """The number a finished point recorded under `key` in its metrics.json (what its job returned to the sweeper
    then); NaN where it has none."""
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def incomplete_reason(run_dir: str | os.PathLike, sha: str, also: tuple[str, ...] = ()) -> Optional[str]:
    """Why the point in `run_dir` must run (None: it is complete for the config whose hash is `sha`)."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / "metrics.json")
    if record is None:
        return "no readable metrics.json"
    if record.get("status") != "ok":
        return f"its last run ended {record.get('status')!r}"
    info = read_json(run_dir / "run.json")
    if info is None:
        return "no readable run.json"
    if info.get("config_sha256") != sha:
        return "its config changed" if info.get("config_sha256") else "run.json has no config hash"
    missing = [name for name in [*info.get("outputs", []), *also] if not (run_dir / name).is_file()]
    return f"{', '.join(missing)} missing" if missing else None


class Point:
    """One sweep point (or single run) in its run folder: skip it when complete, record what was done with it."""

    def __init__(self, cfg, run_dir: str | os.PathLike, also: tuple[str, ...] = ()):
        self.run_dir, self.also = Path(run_dir), also
        self.resume = bool(OmegaConf.select(cfg, "resume", default=True))
        try:
            self.sha: Optional[str] = config_sha256(cfg)
        except Exception:  # an unresolvable config fails the job with its own error; it cannot be complete
            self.sha = None
        self.restarts, self.slurm_job = restarts(), slurm_job()

    def finished(self) -> Optional[dict]:
        """The point's metrics.json record when it is complete and `resume` is on: `job.json` says "skipped" and
        one line says so. None when the point must run."""
        if not self.resume or self.sha is None:
            return None
        reason = incomplete_reason(self.run_dir, self.sha, self.also)
        if reason is not None:
            if (self.run_dir / JOB_FILE).is_file():  # it ran before: say why it runs again
                print(f"t2vz: job {self.run_dir.name} runs (again): {reason}")
            return None
        self.write_job(SKIPPED)
        print(f"t2vz: job {self.run_dir.name} skipped: complete already (same config, sha256 {self.sha[:12]}); "
              "resume=false runs it again")
        return read_json(self.run_dir / "metrics.json")

    def skip_or_begin(self, record: dict, key: Optional[str]) -> Optional[float]:
        """A job's first step. A complete point (`finished`) gives the number its metrics.json recorded under `key`
        (`recorded_number`: what the job returns to the sweeper), and the job returns it at once, its files
        untouched. Otherwise None: the point `begin`s and the job's metrics.json `record` gets the scheduler's
        fields (`scheduler_record`)."""
        finished = self.finished()
        if finished is not None:
            return recorded_number(finished, key)
        self.begin()
        record.update(self.scheduler_record())
        return None

    def begin(self) -> None:
        """The point runs: a metrics.json left by an earlier run is removed first (so a run killed now leaves the
        point incomplete, never "ok" with half-rewritten files), and `job.json` says "running"."""
        (self.run_dir / "metrics.json").unlink(missing_ok=True)
        self.write_job(RUNNING)
        if self.restarts:
            print(f"t2vz: job {self.run_dir.name} restarted by Slurm (restart {self.restarts} of job "
                  f"{self.slurm_job}); it runs again from the start", file=sys.stderr)

    def end(self, status: str) -> None:
        """The point ran: metrics.json's `status` "ok" → job.json "ran"; "skipped" (its method cannot run on the
        models given) → "not run"; anything else → "failed"."""
        self.write_job({"ok": RAN, "skipped": NOT_RUN}.get(status, FAILED))

    def run_info(self) -> dict[str, Any]:
        """What run.json records for resuming: the config hash, and under Slurm the job id and restarts."""
        info: dict[str, Any] = {"config_sha256": self.sha}
        if self.slurm_job:
            info.update(slurm_job=self.slurm_job, restarts=self.restarts)
        return info

    def scheduler_record(self) -> dict[str, Any]:
        """What metrics.json (and so summary.csv) records of the scheduler: Slurm job id and restarts."""
        return {"slurm_job": self.slurm_job, "restarts": self.restarts} if self.slurm_job else {}

    def write_job(self, action: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"action": action, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config_sha256": self.sha,
                  **self.scheduler_record()}
        write_text(self.run_dir / JOB_FILE, json.dumps(record, indent=2) + "\n")

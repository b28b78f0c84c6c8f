"""Results of every job logged to Weights & Biases; W&B trouble never fails a job.

    with Tracker(LoggerConfig(), run_dir, config_dict, name="horse") as tracker:   # one W&B run per job
        tracker.log_metrics({"clip_score": 0.31})   # run summary + one history step
        tracker.log_video(run_dir / "video.mp4")    # history key "video": the mp4 as it is (files/media/videos/)
        tracker.log_image("sheet", run_dir / "video_sheet.png")

The run's config is the resolved job config (plus `info`, e.g. run.json, under "run"); W&B's files go to
`{dir}/wandb/{offline-,}run-DATE-ID/`, dir = the job's output folder unless `LoggerConfig.dir` says otherwise. Jobs
of one multirun share a group (`sweep_group`); then `MultirunSummary`, a Hydra callback, writes `summary.csv` from
every job's `metrics.json` into the sweep folder and logs one "summary" run with the same table. The mode is
`LoggerConfig.mode`, else WANDB_MODE. An online run waits at most `LoggerConfig.init_timeout` seconds for W&B; if it
cannot be reached, one RuntimeWarning, and this and every later job of the run or sweep log offline (or not at
all, `on_unreachable`) without waiting again. Any other W&B error is one RuntimeWarning, after which the tracker
does nothing: the caller's local files are the record.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

from ..video_io import write_text
from .resume import JOB_FILE, read_json, summary_run_id

WANDB_MODES = ("online", "offline", "disabled")
UNREACHABLE_MODES = ("offline", "disabled")
LOGIN_TIMEOUT_S = 30  # online without a stored login, W&B asks on a terminal: an unattended job must not wait
SKIPPED = "skipped"  # a job's status when its method cannot run on the models given: neither ok nor failed
UNREACHABLE_FILE = ".wandb_unreachable"  # in a sweep folder: W&B could not be reached, the other jobs skip trying
_unreachable = False  # this process could not reach W&B: later runs go straight to `on_unreachable`


@dataclass
class LoggerConfig:
    """Where and how jobs are logged to W&B (`Tracker`, `MultirunSummary`)."""

    enabled: bool = True
    project: str = "t2vz"
    entity: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; None: WANDB_MODE decides (W&B's default: online)
    group: Optional[str] = None  # None: the multirun's sweep folder (`sweep_group`); single runs get none
    tags: list[str] = field(default_factory=list)
    dir: Optional[str] = None  # where W&B writes its run folders; None: the job's output folder
    init_timeout: float = 15.0  # seconds an online run waits for W&B's server before giving up (W&B's own: 90)
    on_unreachable: str = "offline"  # when W&B cannot be reached online: offline runs (wandb sync later), or disabled

    def __post_init__(self):
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={self.mode!r} is not one of {', '.join(WANDB_MODES)}; "
                             "or null to leave WANDB_MODE in charge")
        if self.on_unreachable not in UNREACHABLE_MODES:
            raise ValueError(f"logger.on_unreachable={self.on_unreachable!r} is not one of "
                             f"{', '.join(UNREACHABLE_MODES)}")
        if isinstance(self.init_timeout, bool) or not isinstance(self.init_timeout, (int, float)) \
                or not 0 < self.init_timeout < float("inf"):
            raise ValueError(f"logger.init_timeout={self.init_timeout!r} must be a positive number of seconds")


def as_logger_config(config: LoggerConfig | Mapping | None) -> LoggerConfig:
    """A LoggerConfig from itself, a dict or an OmegaConf node (checked by `__post_init__`); None: the defaults."""
    return config if isinstance(config, LoggerConfig) else LoggerConfig(**(to_dict(config) or {}))


def to_dict(node: Mapping | None) -> Optional[dict]:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node and dict(node)


def sweep_group(sweep_dir: str | os.PathLike) -> str:
    """A multirun's W&B group: the sweep folder's last two path parts, so Hydra's multirun/DATE/TIME → DATE_TIME
    and hydra.sweep.dir=sweeps/motion → sweeps_motion."""
    return "_".join(Path(sweep_dir).parts[-2:])


def hydra_sweep_dir() -> Optional[Path]:
    """The sweep folder of the running Hydra multirun job; None outside Hydra or in a single run."""
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return Path(HydraConfig.get().sweep.dir) if multirun else None


def hydra_sweep_group() -> Optional[str]:
    """`sweep_group` of the running Hydra multirun job; None outside Hydra or in a single run."""
    sweep_dir = hydra_sweep_dir()
    return None if sweep_dir is None else sweep_group(sweep_dir)


class Tracker:
    """One W&B run for one job, as a context manager; `finish` runs on exit with the job's exit code (an exception
    or a non-zero `SystemExit` marks the run failed). With `run_id` (`resume.point_run_id`), the run is W&B's run of
    that id, continued if it exists (`resume="allow"`): a rerun, requeued or resumed point keeps one run. Disabled
    (`enabled=False` or mode "disabled") or after any W&B error, every method does nothing. `run_path` ("entity/project/id") and `run_dir` (W&B's folder for this run,
    holding `run-ID.wandb` and `files/`) are set by `start` (and kept after `finish`); None when no run started."""

    def __init__(self, config: LoggerConfig | Mapping | None, run_dir: str | os.PathLike,
                 run_config: Mapping | None = None, name: Optional[str] = None, *, info: Mapping | None = None,
                 job_type: str = "generate", group: Optional[str] = None, run_id: Optional[str] = None):
        self.config, self.job_dir, self.run_id = as_logger_config(config), Path(run_dir), run_id
        self.run_config = {**(to_dict(run_config) or {}), **({"run": dict(info)} if info else {})}
        self.name, self.job_type, self.group = name, job_type, group or self.config.group
        self.run, self.run_path, self.run_dir, self.failed = None, None, None, False

    def start(self) -> Tracker:
        """Start the W&B run (`wandb.init`, online runs waiting at most `init_timeout` s for the server). If W&B
        cannot be reached online, one warning, and this run and every later one of the process or the sweep go
        `on_unreachable` (offline or disabled) without trying again. Any other failure: one warning, a no-op
        tracker."""
        global _unreachable
        mode = self.config.mode or os.environ.get("WANDB_MODE", "online")  # W&B's own default: online
        if not self.config.enabled or mode == "disabled" or self.run is not None:
            return self
        online = mode not in ("offline", "dryrun")  # online, or W&B's legacy "run", "shared"
        marker = self.unreachable_marker()
        if online and (_unreachable or (marker is not None and marker.exists())):
            return self.start_unreachable()  # W&B was unreachable earlier in this run or sweep: do not wait again
        if online and not self._call("starting the run", lambda _: self.logged_in(), always=True):
            return self
        if not online:
            return self.started(self._call("starting the run", lambda _: self.init(self.config.mode), always=True))
        try:
            return self.started(self.init(self.config.mode))
        except Exception as e:  # no network, a firewall, W&B down: the rest of the run or sweep skips trying
            _unreachable = True
            if marker is not None:
                write_text(marker, f"{type(e).__name__}: {e}\n")
            sync = " (wandb sync their runs later)" if self.config.on_unreachable == "offline" else ""
            warnings.warn(f"W&B could not be reached within logger.init_timeout={self.config.init_timeout} s "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); this and the following jobs log "
                          f"{self.config.on_unreachable}{sync}", RuntimeWarning, stacklevel=2)
            return self.start_unreachable()

    def start_unreachable(self) -> Tracker:
        """The run in `on_unreachable` mode: offline (kept for `wandb sync`), or none at all."""
        if self.config.on_unreachable == "disabled":
            return self
        return self.started(self._call("starting the run", lambda _: self.init("offline"), always=True))

    def init(self, mode: Optional[str]):
        """`wandb.init` for this job's run in `mode` (None: WANDB_MODE decides), waiting at most `init_timeout` s
        for the server; None when W&B turned itself off."""
        import wandb

        folder = Path(self.config.dir) if self.config.dir else self.job_dir
        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=self.config.project, entity=self.config.entity, mode=mode, dir=str(folder), name=self.name,
            group=self.group or hydra_sweep_group(), job_type=self.job_type, tags=list(self.config.tags),
            config=self.run_config, reinit="create_new", id=self.run_id, resume="allow" if self.run_id else None,
            settings=wandb.Settings(init_timeout=float(self.config.init_timeout)))
        return None if run.disabled else run  # W&B turns itself off after a login timeout

    def started(self, run) -> Tracker:
        self.run = run
        if run is not None:
            self.run_path, self.run_dir = run.path, Path(run.settings.sync_dir)
        return self

    @staticmethod
    def logged_in() -> bool:
        """An online run needs a W&B key: a stored one, or one typed within LOGIN_TIMEOUT_S on a terminal."""
        import wandb

        if not wandb.login(timeout=LOGIN_TIMEOUT_S, verify=False):
            raise RuntimeError("no W&B login (run `wandb login`, or set WANDB_MODE=offline)")
        return True

    @staticmethod
    def unreachable_marker() -> Optional[Path]:
        """The running Hydra multirun's `.wandb_unreachable` file (shared by jobs in other processes); None
        outside a multirun."""
        sweep_dir = hydra_sweep_dir()
        return None if sweep_dir is None else sweep_dir / UNREACHABLE_FILE

    def _call(self, what: str, fn: Callable[[Any], Any], always: bool = False) -> Any:
        """fn(run) if the run is live (or `always`); any exception → one warning, and the tracker turns no-op."""
        try:
            return fn(self.run) if self.run is not None or always else None
        except Exception as e:  # W&B must never fail a job: its local results are already written
            self.run = None
            warnings.warn(f"W&B logging is off for this job: {what} failed ({type(e).__name__}: {e}); "
                          f"its results are still in {self.job_dir}", RuntimeWarning, stacklevel=3)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Metrics as one history step; `run.log` also makes them the run's summary."""
        self._call("logging metrics", lambda run: run.log(dict(metrics)))

    def _log_media(self, key: str, what: str, make: Callable[[Any], Any]) -> None:
        if self.run is not None:
            import wandb
            self._call(f"logging {what}", lambda run: run.log({key: make(wandb)}))

    def log_video(self, path: str | os.PathLike, key: str = "video") -> None:
        """An mp4/gif by path, uploaded as it is (wandb 0.31 takes the format from the suffix; no re-encoding, no
        moviepy): history key `key`, file `files/media/videos/`."""
        self._log_media(key, f"the video {path}", lambda wandb: wandb.Video(str(path)))

    def log_image(self, key: str, path: str | os.PathLike) -> None:
        """An image file (the contact sheet): history key `key`, file `files/media/images/`."""
        self._log_media(key, f"the image {path}", lambda wandb: wandb.Image(str(path)))

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A `wandb.Table`, one row per entry of `rows`: history key `key`, file `files/media/table/`."""
        self._log_media(key, f"the table {key}", lambda wandb: wandb.Table(columns, rows, allow_mixed_types=True))

    def fail(self, error: str) -> None:
        """A job that caught its own error: `error` into the run's summary, and exit code 1 at `finish`."""
        self.failed = True
        self._call("recording the error", lambda run: run.summary.update({"error": error}))

    def finish(self, exit_code: int = 0) -> None:
        """End the run; exit_code ≠ 0 (or an earlier `fail`) marks it failed. An offline run stays in `run_dir`
        for `wandb sync`."""
        self._call("finishing the run", lambda run: run.finish(exit_code=exit_code or int(self.failed)))
        self.run = None

    def __enter__(self) -> Tracker:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        code = 0 if exc is None else 1
        if isinstance(exc, SystemExit):  # sys.exit(n): n; sys.exit(): 0; sys.exit("message"): 1
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        self.finish(code)
        return False


def scalar(value: Any) -> Any:
    """A table cell: None, bool, int, float and str as they are; anything else (a list) as its str."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Hydra overrides ["method.t0=40", "prompt='a cat'"] → {"method.t0": 40, "prompt": "a cat"}, typed by
    Hydra's own parser (numbers stay numbers in the table); an unparsable one is split at its first "="."""
    parser, out = OverridesParser.create(), {}
    for text in overrides:
        try:
            o = parser.parse_override(text)
            key, value = o.get_key_element(), o.value()
        except Exception:
            key, _, value = text.partition("=")
        out[key] = scalar(value)
    return out


def collect_jobs(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One flat row per job folder under `sweep_dir` (a folder with `metrics.json` or Hydra's
    `.hydra/overrides.yaml`), in job order: job (the folder, relative), the overrides, the metrics, status, error.
    A job without metrics.json has status "missing" (it died before writing it)."""
    sweep_dir = Path(sweep_dir)
    folders = {p.parent for p in sweep_dir.glob("**/metrics.json")}
    folders |= {p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")} - {sweep_dir}
    rows = []
    for folder in sorted(folders, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]):
        try:
            metrics = dict(json.loads((folder / "metrics.json").read_text()))
        except FileNotFoundError:
            overrides = OmegaConf.load(folder / ".hydra/overrides.yaml")
            metrics = {"overrides": list(overrides), "status": "missing", "error": "no metrics.json"}
        except (OSError, ValueError, TypeError) as e:
            metrics = {"status": "unreadable", "error": f"metrics.json: {e}"}
        row = {"job": folder.relative_to(sweep_dir).as_posix(), **parse_overrides(metrics.pop("overrides", []))}
        status, error = metrics.pop("status", "ok"), metrics.pop("error", None)
        row.update({key: scalar(value) for key, value in metrics.items()})
        action = last_action(folder)
        rows.append({**row, **({"action": action} if action else {}), "status": status, "error": error})
    return rows


def last_action(folder: Path) -> Optional[str]:
    """What the last invocation did with the job (`resume.JOB_FILE`: ran, skipped as complete, failed, or
    running if it died); None for a job folder without one (written before resuming existed)."""
    record = read_json(folder / JOB_FILE)
    return str(record["action"]) if record and record.get("action") else None


def job_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """{jobs, ok, failed, skipped, resumed, ran} of `collect_jobs` rows: skipped jobs (status "skipped", a method
    that cannot run on the models given) are neither ok nor failed; every other status but ok (failed, missing,
    unreadable) counts as failed. Of the ok jobs, `resumed` were skipped by the last invocation as complete
    already (their job.json action "skipped") and `ran` ran."""
    rows = list(rows)
    statuses = [row.get("status") for row in rows]
    ok, skipped = statuses.count("ok"), statuses.count(SKIPPED)
    resumed = sum(row.get("status") == "ok" and row.get("action") == "skipped" for row in rows)
    return {"jobs": len(statuses), "ok": ok, "failed": len(statuses) - ok - skipped, "skipped": skipped,
            "resumed": resumed, "ran": ok - resumed}


def counts_line(counts: dict[str, int]) -> str:
    """"5 points: 2 ran, 3 skipped as complete already, 0 failed" (and the jobs whose method cannot run)."""
    text = (f"{counts['jobs']} point{'s' * (counts['jobs'] != 1)}: {counts['ran']} ran, {counts['resumed']} skipped "
            f"as complete already, {counts['failed']} failed")
    return text + (f", {counts['skipped']} not run (their method cannot run on the models given)"
                   if counts["skipped"] else "")


def write_summary_csv(path: Path, rows: list[dict[str, Any]], last: tuple[str, ...] = ("status", "error")) -> list[str]:
    """`rows` as CSV at `path`, written atomically (empty cells for keys a row lacks), the columns `last` at the
    end (always there: a job table shows its status column even when every job is ok). Returns the columns."""
    columns = [*dict.fromkeys(k for row in rows for k in row if k not in last), *last]
    writer = csv.DictWriter(text := io.StringIO(), columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())
    return columns


class MultirunSummary(Callback):
    """Hydra callback: at the end of a multirun, `summary.csv` in the sweep folder (one row per job: overrides,
    metrics, what the last invocation did with the job (`action`: ran, skipped as complete, failed), status, error),
    one line counting them, and one W&B run per sweep folder (job_type "summary", the jobs' group; a rerun continues
    it) whose history key "jobs" is the same table as a `wandb.Table`, and whose summary holds jobs_ok /
    jobs_skipped / jobs_failed / jobs_ran / jobs_resumed. W&B settings come
    from the composed config's `logger_key` node (a `LoggerConfig`; defaults where the config has none). A job with
    status "skipped" (a method that cannot run on the models given) is neither ok nor failed. When no job is ok and
    some failed (every job that was not skipped), it exits with status 2 after writing them."""

    def __init__(self, logger_key: str = "logger"):
        self.logger_key = logger_key

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        logger = as_logger_config(OmegaConf.select(config, self.logger_key, default=None))
        rows = collect_jobs(sweep_dir)
        resumable = any("action" in row for row in rows)  # jobs that record what was done with them (job.json)
        columns = write_summary_csv(sweep_dir / "summary.csv", rows,
                                    last=("action", "status", "error") if resumable else ("status", "error"))
        group = logger.group or sweep_group(sweep_dir)
        run_config = {"sweep_dir": str(sweep_dir), "jobs": len(rows),
                      "sweep_overrides": list(OmegaConf.select(config, "hydra.overrides.task", default=[]))}
        counts = job_counts(rows)
        ok, skipped, failed = counts["ok"], counts["skipped"], counts["failed"]
        with Tracker(logger, sweep_dir, run_config, name=f"{group}-summary", job_type="summary", group=group,
                     run_id=summary_run_id(sweep_dir)) as t:
            t.log_table("jobs", columns, [[row.get(c) for c in columns] for row in rows])
            t.log_metrics({"jobs_ok": ok, "jobs_skipped": skipped, "jobs_failed": failed,
                           "jobs_ran": counts["ran"], "jobs_resumed": counts["resumed"]})
        print(f"t2vz: sweep {sweep_dir}: {counts_line(counts)}; the table is {sweep_dir / 'summary.csv'}")
        if ok == 0 and failed:  # a sweep in which nothing ran: fail it, as a single failed job does
            what = f"all {failed} jobs of the sweep failed" if not skipped else \
                f"no job of the sweep ran: {failed} failed, {skipped} skipped"
            print(f"t2vz: {what}; their errors are in {sweep_dir / 'summary.csv'}", file=sys.stderr)
            sys.exit(2)

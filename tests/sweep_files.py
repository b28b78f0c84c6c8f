"""What a sweep's folders say, read back for the resume and Slurm tests: the summary table, what the last
invocation did with each point (job.json), the files a finished point keeps and their mtimes, and the id of every
offline W&B run a point opened."""
from __future__ import annotations

import csv
import json
from pathlib import Path

FINISHED = ("video.mp4", "video_sheet.png", "frames.npz", "config.yaml", "run.json", "metrics.json")


def summary_rows(sweep: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((sweep / "summary.csv").open()))


def mtimes(job: Path) -> dict[str, int]:
    return {name: (job / name).stat().st_mtime_ns for name in FINISHED}


def action(job: Path) -> str | None:
    """job.json's action (ran, skipped, failed, running); None before the job wrote one."""
    try:
        return json.loads((job / "job.json").read_text())["action"]
    except (OSError, ValueError, KeyError):
        return None


def wandb_ids(job: Path) -> list[str]:
    """The run id of every offline W&B run folder of a job, read from its `run-ID.wandb` file (the folder's name,
    offline-run-DATE_TIME-ID, gets a -1 suffix when two start in the same second)."""
    return [f.name[len("run-"):-len(".wandb")] for p in sorted((job / "wandb").glob("offline-run-*"))
            for f in p.glob("run-*.wandb")]

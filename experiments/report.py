"""Tables, plots and a frame sheet of one multirun folder (see `t2vz.experiment.report`).

    python experiments/report.py multirun/2024-01-01/12-00-00            # writes into that folder
    python experiments/report.py sweeps/lambda --out reports/lambda

Writes report.csv/.md (one row per job), report_by_setting.csv/.md (mean, std and the 95% interval's half-width per
setting over seeds, prompts and pairs), report_paired.csv/.md (each setting against the sweep's first value, paired
on seed, prompt and pair: mean difference, its standard error and 95% interval), report_paper.csv/.md (the
paper's table layout, when the jobs have clip_score or textual_faithfulness), plot_{metric}_vs_{key}.png and
frames_by_setting.png. Prints how many jobs were ok, failed and skipped, then each path. A folder without job
results: an error message and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from t2vz.experiment.report import ReportError, counts_text, load_jobs, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("multirun_dir", help="a multirun folder holding job folders 0/, 1/, …")
    parser.add_argument("--out", default=None, help="where to write the report (default: MULTIRUN_DIR)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.multirun_dir, args.out)
        rows, _, _ = load_jobs(args.multirun_dir)
    except (ReportError, OSError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {counts_text(rows)}")
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

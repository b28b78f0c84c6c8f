"""How well a sweep's CLIP scores agree with the toy world's judge (see `t2vz.experiment.agreement`).

    python experiments/run.py -m +experiment=toy_clip_agreement           # 208 toy videos with the toy CLIP's score
    python experiments/clip_agreement.py multirun/DATE/TIME                # clip_agreement.md and .json there

Prints the AUC of the CLIP score for the videos the judge reads as right against wrong, Spearman's ρ over videos
and over prompts, and the held-out against seen captions. A folder without scored toy videos: one line, exit 2.
"""
from __future__ import annotations

import argparse
import sys

from t2vz.experiment.agreement import AgreementError, write_agreement


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="a multirun folder of experiments/run.py jobs on the toy model")
    parser.add_argument("--out", default=None, help="where to write clip_agreement.md/.json (default: SWEEP_DIR)")
    parser.add_argument("--command", default=None, help="the sweep's command, recorded under the tables")
    args = parser.parse_args(argv)
    try:
        paths = write_agreement(args.sweep_dir, args.out, args.command)
    except (AgreementError, OSError) as e:
        print(f"clip_agreement: error: {e}", file=sys.stderr)
        return 2
    print(paths[1].read_text(encoding="utf-8").split("\n\n| prompt |")[0])
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

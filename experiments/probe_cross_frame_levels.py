"""Probe: at which UNet levels does cross-frame attention cost the toy model its vertical motion (README, "Motion")?

    .venv/bin/python experiments/probe_cross_frame_levels.py fine     # cross-frame attention at 16×16 only
    .venv/bin/python experiments/probe_cross_frame_levels.py coarse   # at 8×8 and 4×4 only

The judge's motion videos for λ = 32, δ = (0, 1) and (1, 1) (its 8 prompts × 2 seeds, 50 DDIM steps, warp at
t0 = t1 = 15), with frame 1's keys and values shared (`cross_frame="first"`) only in the self-attention layers of
the chosen levels and plain per-frame self-attention elsewhere; prints the mean motion error
(`judge.motion_errors`). The full method and cross_frame=off are the rows of `judge_toyworld.py`. A probe, not a
feature: it swaps `Attention.forward` for one that drops `cross_frame` by the layer's token count (16×16 = 256).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import t2vz  # noqa: E402
from judge_toyworld import SEED_OFFSET, seen_prompts  # noqa: E402
from t2vz.attention import Attention  # noqa: E402
from t2vz.toyworld.judge import motion_errors, requested_motion  # noqa: E402
from t2vz.toyworld.world import HELD_OUT, caption  # noqa: E402

FINE_TOKENS = 16 * 16  # the toy UNet's finest attention level: 16×16 latents


def share_only_at(levels: str) -> None:
    """Make cross-frame attention apply only at the `fine` (16×16) or `coarse` (8×8, 4×4) levels."""
    forward = Attention.forward

    def patched(self, x, context=None, cross_frame=None):
        fine = x.shape[1] >= FINE_TOKENS
        if context is None and cross_frame is not None and fine != (levels == "fine"):
            cross_frame = None
        return forward(self, x, context, cross_frame)

    Attention.forward = patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("levels", choices=("fine", "coarse"), help="where frame 1's keys and values are shared")
    args = parser.parse_args()
    share_only_at(args.levels)
    pipe = t2vz.TextToVideoZero.from_pretrained("toyworld")
    combos = list(HELD_OUT)[:4] + seen_prompts(len(HELD_OUT))[:4]  # the judge's video prompts, in its order
    print("| cross-frame attention at | δ | videos | mean error px/frame | videos within 1 px |")
    print("| --- | --- | --- | --- | --- |")
    for direction in ([0.0, 1.0], [1.0, 1.0]):
        errors = []
        for k, (colour, shape, background) in enumerate(combos):
            for j in range(2):
                frames = pipe(caption(background, [(colour, shape)]), num_frames=8, motion_strength=32.0,
                              direction=direction, t0=15, t1=15, progress=False,
                              generator=torch.Generator().manual_seed(SEED_OFFSET + 100 * k + j))
                errors.append(motion_errors(frames, requested_motion(32.0, direction, 64, 64)).norm(dim=1).mean())
        errors = np.array(errors)
        print(f"| {args.levels} | ({direction[0]:g},{direction[1]:g}) | {len(errors)} | {errors.mean():.2f} | "
              f"{(errors <= 1).mean():.0%} |", flush=True)


if __name__ == "__main__":
    main()

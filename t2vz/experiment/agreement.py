"""Does a CLIP score agree with the toy world's judge? Over the videos of one sweep on the toy model (each job's
saved uint8 frames, `frames.npz`, and its prompt), how well the CLIP model the jobs were scored with (`clip_model`)
tells what the judge reads as right from wrong.

    result = agreement("multirun/2026-12-06/18-00-00")   # every ok job with frames.npz and a one-object prompt
    paths = write_agreement("multirun/…", out_dir)        # clip_agreement.json and clip_agreement.md

For each video and each caption that differs from its prompt in one attribute (each other colour, shape and
background: 4 + 3 + 4 captions) and the prompt itself, the judge reads whether the video shows it: `object_ok`,
the fraction of frames in which it sees the caption's object in its colour and shape (`judge.judge_image`), and
`background_ok`, the fraction in which the background it sees is the caption's (`judge.background_kind`). A
(video, caption) is **right** when both are at least 1/2. CLIP scores every one of them (100 · mean cosine over
the frames, `ClipScorer`). Two questions, each answered within a group that shares its baseline, because a CLIP
score's level depends on the caption (two prompts' scores differ by 16 points on the toy CLIP whatever the video):

- **captions of one video**: the AUC of the CLIP score for right against wrong captions, over the pairs (right,
  wrong) of the same video (the probability that CLIP puts the caption the judge reads as right above one it reads
  as wrong; ties one half), over all captions and per changed attribute;
- **videos of one prompt**: the AUC of the prompt's CLIP score for videos the judge reads as right against wrong,
  over the pairs of videos of the same prompt (the generated videos' own errors; mostly shape, on the toy model).

And whether CLIP ranks the toy model's text faithfulness of held-out against seen captions (`world.HELD_OUT`) as
the judge does: the judge's `object_ok` per group, against CLIP's reading, the fraction of videos whose prompt
scores above each of its 11 one-attribute variants; each with a 95% Student-t interval over the videos, and the
difference seen − held-out with its 95% Welch interval: each reading says "seen above", "held-out above" or "no
difference" (the interval holds 0), and the two agree when they say the same.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..video_io import write_text
from .report import mean_std, t_interval, t_quantile
from .tracking import collect_jobs

ATTRIBUTES = ("colour", "shape", "background")


def average_ranks(values) -> np.ndarray:
    """Ranks 1…n of `values`, ties sharing the mean of the ranks they span (as Spearman's ρ and the U test use)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2.0  # the mean of ranks start+1 … end
            start = end
    return ranks


def pair_counts(scores, labels) -> tuple[float, int]:
    """(wins, pairs) over the pairs (positive, negative): wins counts a positive scored above the negative as 1 and
    a tie as 1/2 (the Mann–Whitney U statistic); pairs = n₊ · n₋."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.0, 0
    rank_sum = average_ranks(scores)[labels].sum()
    return float(rank_sum - n_pos * (n_pos + 1) / 2.0), n_pos * n_neg


def auc(scores, labels) -> float:
    """The area under the ROC curve of `scores` for the boolean `labels`: P(score of a positive > score of a
    negative), ties counted one half. NaN when either class is empty."""
    wins, pairs = pair_counts(scores, labels)
    return wins / pairs if pairs else float("nan")


def grouped_auc(groups) -> tuple[float, int]:
    """The AUC over the pairs (positive, negative) within each group of `groups`, an iterable of (scores, labels):
    (Σ wins / Σ pairs, Σ pairs); NaN without a pair. Pairs across groups are never compared."""
    wins = pairs = 0
    for scores, labels in groups:
        w, n = pair_counts(scores, labels)
        wins, pairs = wins + w, pairs + n
    return (wins / pairs if pairs else float("nan")), pairs


def welch_difference(a, b) -> tuple[float, float]:
    """mean(a) − mean(b) and the half-width of its 95% Welch interval, t_{0.975, ν} · √(s_a²/n_a + s_b²/n_b) with
    the Welch–Satterthwaite ν; NaN half-width when either has fewer than two values."""
    mean_a, std_a, n_a = mean_std(a)
    mean_b, std_b, n_b = mean_std(b)
    if n_a < 2 or n_b < 2:
        return mean_a - mean_b, float("nan")
    va, vb = std_a**2 / n_a, std_b**2 / n_b
    if va + vb == 0:
        return mean_a - mean_b, 0.0
    dof = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    return mean_a - mean_b, t_quantile(0.975, dof) * math.sqrt(va + vb)


def spearman(a, b) -> float:
    """Spearman's rank correlation ρ: Pearson's correlation of the average ranks. NaN when either is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def caption_variants(prompt: str) -> list[tuple[str, str]]:
    """[(attribute, caption)]: ("prompt", the prompt's caption), then each caption differing in one attribute: every
    other colour, shape and background (4 + 3 + 4 on the toy world). A prompt without exactly one object: []."""
    from ..toyworld.world import BACKGROUNDS, OBJECT_COLOURS, SHAPES, caption, parse_caption

    pairs, background = parse_caption(prompt)
    if len(pairs) != 1 or background is None:
        return []
    (colour, shape), = pairs
    out = [("prompt", caption(background, [(colour, shape)]))]
    out += [("colour", caption(background, [(c, shape)])) for c in OBJECT_COLOURS if c != colour]
    out += [("shape", caption(background, [(colour, s)])) for s in SHAPES if s != shape]
    out += [("background", caption(b, [(colour, shape)])) for b in BACKGROUNDS if b != background]
    return out


def judge_reading(frames: np.ndarray, captions: list[str]) -> list[dict[str, float]]:
    """The judge's reading of one video, uint8 frames (f, h, w, 3), against each caption: object_ok, background_ok
    (fractions of frames) and right (both ≥ 1/2). Each frame's background is judged once."""
    from ..toyworld.judge import background_kind, judge_image
    from ..toyworld.world import parse_caption

    backgrounds = [background_kind(f) for f in frames]
    out = []
    for text in captions:
        object_ok = float(np.mean([judge_image(f, text)["all_ok"] for f in frames]))
        background_ok = float(np.mean([b == parse_caption(text)[1] for b in backgrounds]))
        out.append({"object_ok": object_ok, "background_ok": background_ok,
                    "right": bool(object_ok >= 0.5 and background_ok >= 0.5)})
    return out


def held_out(prompt: str) -> bool:
    """Whether a caption names a held-out (colour, shape, background) combination (`world.HELD_OUT`)."""
    from ..toyworld.world import is_held_out, parse_caption

    pairs, background = parse_caption(prompt)
    return any(is_held_out(colour, shape, background) for colour, shape in pairs)


class AgreementError(ValueError):
    """The sweep has nothing to measure agreement on (the message says why)."""


def read_videos(sweep_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Every ok job with frames.npz and a one-object toy prompt: {job, prompt, frames (f, h, w, 3) uint8}, one per
    video of the job; and the distinct CLIP model names (`clip_model`) the jobs were scored with."""
    sweep_dir = Path(sweep_dir)
    videos, clip_models = [], []
    for row in collect_jobs(sweep_dir):
        path = sweep_dir / row["job"] / "frames.npz"
        prompt = str(row.get("prompt", "")).strip('"')
        if row["status"] != "ok" or not path.is_file() or not caption_variants(prompt):
            continue
        with np.load(path) as data:
            frames = data["frames"]
        videos += [{"job": row["job"], "prompt": prompt, "frames": video}
                   for video in (frames if frames.ndim == 5 else frames[None])]
        if row.get("clip_model") and str(row["clip_model"]) not in clip_models:
            clip_models.append(str(row["clip_model"]))
    if not videos:
        raise AgreementError(f"{sweep_dir} has no ok job with frames.npz and a one-object toy-world prompt; run a "
                             "sweep of experiments/run.py on the toy model first (+experiment=toy_clip_agreement)")
    return videos, clip_models


def score_captions(scorer, videos: list[dict[str, Any]]) -> None:
    """Add to each video `captions` [(attribute, caption)] and `scores`, 100 · the mean cosine over its frames
    with each caption (`ClipScorer`: the frames' embeddings computed once, each distinct caption's once)."""
    import torch

    texts = sorted({c for v in videos for _, c in caption_variants(v["prompt"])})
    text = scorer.text_embeddings(texts)
    index = {t: i for i, t in enumerate(texts)}
    for v in videos:
        v["captions"] = caption_variants(v["prompt"])
        image = scorer.image_embeddings(torch.from_numpy(v["frames"]).float() / 255.0)  # (f, d)
        cos = (image @ text[[index[c] for _, c in v["captions"]]].T).mean(0)  # the frames' mean, per caption
        v["scores"] = (100.0 * cos).tolist()


def agreement(sweep_dir: str | os.PathLike, scorer=None) -> dict[str, Any]:
    """The agreement of CLIP with the judge over the sweep's videos (see the module's docstring). `scorer`: a
    `ClipScorer`; default the CLIP model the jobs recorded (`run.cached_scorer`), the toy CLIP if they recorded
    none."""
    videos, clip_models = read_videos(sweep_dir)
    if scorer is None:
        from .config import TOY_CLIP
        from .run import cached_scorer

        if len(clip_models) > 1:
            raise AgreementError(f"the jobs were scored with several CLIP models ({', '.join(clip_models)}); "
                                 "measure one sweep per CLIP model")
        scorer = cached_scorer(clip_models[0] if clip_models else TOY_CLIP, "cpu")
    score_captions(scorer, videos)
    for v in videos:
        v["judged"] = judge_reading(v["frames"], [c for _, c in v["captions"]])
        v["held_out"] = held_out(v["prompt"])
        v["clip_reads_prompt"] = bool(all(v["scores"][0] > s for s in v["scores"][1:]))

    def within_videos(attribute: str | None):
        for v in videos:
            keep = [i for i, (a, _) in enumerate(v["captions"]) if attribute is None or a in ("prompt", attribute)]
            yield [v["scores"][i] for i in keep], [v["judged"][i]["right"] for i in keep]

    captions = {"all": grouped_auc(within_videos(None))}
    captions.update({a: grouped_auc(within_videos(a)) for a in ATTRIBUTES})
    prompts = sorted({v["prompt"] for v in videos})
    by_prompt = {p: [v for v in videos if v["prompt"] == p] for p in prompts}
    natural = {
        "objects": grouped_auc(([v["scores"][0] for v in vs], [v["judged"][0]["object_ok"] >= 0.5 for v in vs])
                               for vs in by_prompt.values()),
        "right": grouped_auc(([v["scores"][0] for v in vs], [v["judged"][0]["right"] for v in vs])
                             for vs in by_prompt.values()),
    }
    groups = {}
    for name, flag in (("seen", False), ("held_out", True)):
        mine = [v for v in videos if v["held_out"] == flag]
        if mine:
            j_mean, j_half, n = t_interval([v["judged"][0]["object_ok"] for v in mine])
            c_mean, c_half, _ = t_interval([float(v["clip_reads_prompt"]) for v in mine])
            s_mean, s_half, _ = t_interval([v["scores"][0] for v in mine])
            groups[name] = {"n": n, "judge_object_ok": j_mean, "judge_object_ok_ci95": j_half,
                            "clip_reads_prompt": c_mean, "clip_reads_prompt_ci95": c_half,
                            "clip_score": s_mean, "clip_score_ci95": s_half}
    differences = {}
    if len(groups) == 2:  # seen − held-out, each reading's difference with its 95% interval
        seen = [v for v in videos if not v["held_out"]]
        held = [v for v in videos if v["held_out"]]
        for key, value in (("judge_object_ok", lambda v: v["judged"][0]["object_ok"]),
                           ("clip_reads_prompt", lambda v: float(v["clip_reads_prompt"]))):
            diff, half = welch_difference([value(v) for v in seen], [value(v) for v in held])
            differences[key] = {"seen_minus_held_out": diff, "ci95": half,
                                "sign": 0 if abs(diff) <= half else (1 if diff > 0 else -1)}
    per_prompt = [{"prompt": p, "held_out": vs[0]["held_out"], "n": len(vs),
                   "clip_score": float(np.mean([v["scores"][0] for v in vs])),
                   "clip_reads_prompt": float(np.mean([v["clip_reads_prompt"] for v in vs])),
                   "judge_object_ok": float(np.mean([v["judged"][0]["object_ok"] for v in vs])),
                   "judge_right": float(np.mean([v["judged"][0]["right"] for v in vs]))}
                  for p, vs in by_prompt.items()]
    return {
        "clip_model": scorer.name, "n_videos": len(videos), "n_prompts": len(prompts),
        "n_judged_right": int(sum(v["judged"][0]["right"] for v in videos)),
        "auc_captions": {k: v[0] for k, v in captions.items()},
        "pairs_captions": {k: v[1] for k, v in captions.items()},
        "auc_videos_of_a_prompt": {k: v[0] for k, v in natural.items()},
        "pairs_videos_of_a_prompt": {k: v[1] for k, v in natural.items()},
        "spearman_prompts": spearman([p["clip_reads_prompt"] for p in per_prompt],
                                     [p["judge_object_ok"] for p in per_prompt]),
        "groups": groups, "differences": differences,
        "groups_agree": (differences["judge_object_ok"]["sign"] == differences["clip_reads_prompt"]["sign"]
                         if differences else None),
        "per_prompt": per_prompt,
    }


def _f(value: float | None, digits: int = 3) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def agreement_markdown(result: dict[str, Any], command: str | None = None) -> str:
    """The agreement as a short markdown report: the AUCs, the groups, the prompts."""
    a, n = result["auc_captions"], result["pairs_captions"]
    b, m = result["auc_videos_of_a_prompt"], result["pairs_videos_of_a_prompt"]
    lines = [
        "# CLIP against the toy world's judge", "",
        f"{result['n_videos']} videos of {result['n_prompts']} prompts; the judge reads {result['n_judged_right']} "
        "as showing their prompt (its object in colour and shape, and its background, in ≥ half the frames).", "",
        "| CLIP puts what the judge reads as right above what it reads as wrong | AUC | pairs |", "|---|---|---|",
        f"| captions of one video: the prompt and its 11 one-attribute variants | {_f(a['all'])} | {n['all']} |",
        *(f"| … the prompt and its other {attr}s | {_f(a[attr])} | {n[attr]} |" for attr in ATTRIBUTES),
        f"| videos of one prompt: the judge sees its object (colour and shape) or not | {_f(b['objects'])} "
        f"| {m['objects']} |",
        f"| videos of one prompt: right (object and background) or not | {_f(b['right'])} | {m['right']} |", "",
        "| captions | n | judge: object_ok (95% interval) | CLIP: prompt above all 11 variants (95% interval) "
        "| CLIP score |", "|---|---|---|---|---|",
    ]
    for name, g in result["groups"].items():
        lines.append(f"| {name.replace('_', '-')} | {g['n']} | {_f(g['judge_object_ok'])} ± "
                     f"{_f(g['judge_object_ok_ci95'])} | {_f(g['clip_reads_prompt'])} ± "
                     f"{_f(g['clip_reads_prompt_ci95'])} | {_f(g['clip_score'], 2)} ± {_f(g['clip_score_ci95'], 2)} |")
    if result["differences"]:
        d = result["differences"]
        said = {1: "seen above held-out", -1: "held-out above seen", 0: "no difference"}
        lines += ["", "Seen − held-out (95% Welch interval): judge " +
                  f"{_f(d['judge_object_ok']['seen_minus_held_out'])} ± {_f(d['judge_object_ok']['ci95'])} "
                  f"({said[d['judge_object_ok']['sign']]}), CLIP {_f(d['clip_reads_prompt']['seen_minus_held_out'])} "
                  f"± {_f(d['clip_reads_prompt']['ci95'])} ({said[d['clip_reads_prompt']['sign']]}): "
                  + ("the two agree." if result["groups_agree"] else "**the two disagree**.") +
                  f" Spearman ρ of the two readings over the prompts: {_f(result['spearman_prompts'])}."]
    lines += ["", "| prompt | held out | n | judge: object_ok | judge: right | CLIP: prompt above its variants "
              "| CLIP score |", "|---|---|---|---|---|---|---|"]
    for p in result["per_prompt"]:
        lines.append(f"| {p['prompt']} | {'yes' if p['held_out'] else 'no'} | {p['n']} | {_f(p['judge_object_ok'])} "
                     f"| {_f(p['judge_right'], 2)} | {_f(p['clip_reads_prompt'], 2)} | {_f(p['clip_score'], 2)} |")
    lines += ["", f"CLIP model: {result['clip_model']}."]
    if command:
        lines += ["", f"Measured by: `{command}`"]
    return "\n".join(lines) + "\n"


def write_agreement(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                    command: str | None = None, scorer=None) -> list[Path]:
    """Write clip_agreement.json and clip_agreement.md (atomically) into `out_dir` (default: the sweep folder)."""
    result = agreement(sweep_dir, scorer)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    paths = [out / "clip_agreement.json", out / "clip_agreement.md"]
    write_text(paths[0], json.dumps(result, indent=2, default=lambda x: None) + "\n")
    write_text(paths[1], agreement_markdown(result, command))
    return paths

"""t2vz.experiment.agreement: AUC and Spearman's ρ against brute force and closed forms; the judge's reading of
rendered toy videos; the whole report on a fake sweep of rendered videos."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from t2vz.experiment.agreement import (AgreementError, agreement, auc, average_ranks, caption_variants, grouped_auc,
                                      judge_reading, spearman, welch_difference)
from t2vz.toyworld.world import render_video, sample_scene

ROOT = Path(__file__).resolve().parents[1]


def brute_force_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auc_closed_forms_and_brute_force():
    assert auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert np.isnan(auc([1, 2], [1, 1]))
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    labels = rng.random(40) < 0.4
    assert auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_grouped_auc_never_compares_across_groups():
    """Group 1 ranks its positive above its negative, group 2 below: 1 win in 2 pairs. Pooled, the positives'
    scores (2, 10) against the negatives' (1, 20) would give 2 of 4."""
    assert grouped_auc([([1, 2], [False, True]), ([10, 20], [True, False])]) == (0.5, 2)
    assert grouped_auc([([1, 2, 3], [True, True, True])])[1] == 0  # no negative: no pair
    assert np.isnan(grouped_auc([])[0])


def test_welch_difference_closed_form():
    from t2vz.experiment.report import t_quantile

    a, b = [1.0, 2.0, 3.0], [0.0, 0.0, 1.0, 3.0]
    va, vb = 1.0 / 3, 2.0 / 4  # s² / n: s_a² = 1, s_b² = 2
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    diff, half = welch_difference(a, b)
    assert diff == pytest.approx(1.0) and half == pytest.approx(t_quantile(0.975, dof) * (va + vb) ** 0.5)
    assert np.isnan(welch_difference([1.0], [2.0, 3.0])[1])


def test_caption_variants_change_one_attribute_each():
    variants = caption_variants("a red circle on grass")
    assert variants[0] == ("prompt", "a red circle on grass")
    assert [a for a, _ in variants].count("colour") == 4 and [a for a, _ in variants].count("shape") == 3
    assert ("background", "a red circle on a striped wall") in variants and len(set(variants)) == 12
    assert caption_variants("a red circle and a blue square on grass") == [] == caption_variants("a cat")


def test_average_ranks_and_spearman():
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert spearman([1, 2, 3, 4], [10, 20, 35, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # 1 − 6 Σd² / (n(n² − 1)) without ties: d = (0, 2, −1, −1) → 1 − 6·6/60 = 0.4
    assert spearman([1, 2, 3, 4], [1, 4, 2, 3]) == pytest.approx(0.4)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def toy_video(colour: str, shape: str, background: str, seed: int = 0) -> np.ndarray:
    scene = sample_scene(np.random.default_rng(seed), background=background, things=[(colour, shape)],
                         allow_held_out=True)
    return render_video(scene, 4, (2.0, 0.0))


def test_judge_reading_of_rendered_videos():
    video = toy_video("red", "circle", "grass")
    right, wrong_colour, wrong_background = judge_reading(
        video, ["a red circle on grass", "a blue circle on grass", "a red circle on snow"])
    assert right == {"object_ok": 1.0, "background_ok": 1.0, "right": True}
    assert wrong_colour["object_ok"] == 0.0 and not wrong_colour["right"]
    assert wrong_background["object_ok"] == 1.0 and wrong_background["background_ok"] == 0.0
    assert not wrong_background["right"]


def fake_sweep(folder: Path, jobs: list[tuple[str, np.ndarray]]) -> Path:
    """Job folders as experiments/run.py writes them: metrics.json (overrides, status, clip_model) and frames.npz."""
    for i, (prompt, frames) in enumerate(jobs):
        job = folder / str(i)
        job.mkdir(parents=True)
        record = {"overrides": [f'prompt="{prompt}"', f"seed={i}"], "status": "ok", "clip_model": "toyworld"}
        (job / "metrics.json").write_text(json.dumps(record))
        np.savez_compressed(job / "frames.npz", frames=frames)
    return folder


def test_agreement_on_rendered_videos_with_the_toy_clip(tmp_path):
    """Rendered videos (the judge reads them exactly): the toy CLIP puts each video's own colour above the other
    four (as its zero-shot accuracy on renders says), and the groups follow world.HELD_OUT. Two videos of a prompt
    naming another colour are what the judge reads as wrong among the videos of one prompt."""
    red = [toy_video("red", "circle", "grass", seed) for seed in (0, 1)]
    purple = [toy_video("purple", "circle", "grass", seed) for seed in (2, 3)]  # held out
    jobs = [("a red circle on grass", v) for v in red] + [("a purple circle on grass", v) for v in purple]
    jobs += [("a red circle on grass", purple[0])]  # the judge reads it as wrong: no red object
    result = agreement(fake_sweep(tmp_path / "sweep", jobs))
    assert result["clip_model"] == "toyworld" and result["n_videos"] == 5 and result["n_prompts"] == 2
    assert result["n_judged_right"] == 4
    assert result["auc_captions"]["colour"] == 1.0 and result["pairs_captions"]["colour"] == 5 * 4
    assert result["pairs_videos_of_a_prompt"]["objects"] == 2  # the wrong video against each right one
    assert result["groups"]["held_out"]["n"] == 2 and result["groups"]["seen"]["n"] == 3
    assert result["groups"]["held_out"]["judge_object_ok"] == 1.0
    assert set(result["differences"]) == {"judge_object_ok", "clip_reads_prompt"}


def test_entry_point_writes_both_files_and_refuses_an_empty_folder(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", [("a red circle on grass", toy_video("red", "circle", "grass"))])
    script = ROOT / "experiments" / "clip_agreement.py"
    done = subprocess.run([sys.executable, str(script), str(sweep)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| … the prompt and its other colours | 1.000 | 4 |" in (sweep / "clip_agreement.md").read_text()
    assert json.loads((sweep / "clip_agreement.json").read_text())["n_videos"] == 1
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "empty")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("clip_agreement: error:") and "Traceback" not in done.stderr
    with pytest.raises(AgreementError):
        agreement(tmp_path / "empty")

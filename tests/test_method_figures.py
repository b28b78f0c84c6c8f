"""The figures of docs/method.md (docs/images/method/*.png) are what experiments/method_figures.py makes from the
toy model now: regenerated and compared pixel by pixel within the script's tolerance, so a change of the method or of
the trace that changes a figure fails here until the figures are regenerated. And the tolerance is no blanket: the
same figures made with another seed, or with another α, are refused."""
from __future__ import annotations

import shutil
from pathlib import Path

import method_figures
import pytest

COMMITTED = method_figures.DEFAULT_OUT


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """Every figure, made now into a temporary folder."""
    out = tmp_path_factory.mktemp("figures")
    method_figures.make(out)
    return out


def test_the_committed_figures_are_up_to_date(fresh):
    problems = method_figures.compare_folders(COMMITTED, fresh)
    assert not problems, ("docs/images/method is out of date with the code; regenerate it with "
                          "`.venv/bin/python experiments/method_figures.py`:\n" + "\n".join(problems))
    assert sorted(p.name for p in COMMITTED.glob("*.png")) == sorted(f"{name}.png" for name in method_figures.FIGURES)


def test_check_exits_1_naming_the_figures_that_differ(fresh, tmp_path, monkeypatch, capsys):
    """`--check` itself (its regeneration replaced by a copy of `fresh`): 0 on the committed figures; 1, naming
    the figure, when one of them is another figure's picture."""
    monkeypatch.setattr(method_figures, "make", lambda out, names=None: shutil.copytree(fresh, out,
                                                                                         dirs_exist_ok=True))
    assert method_figures.main(["--check", "--out", str(COMMITTED)]) == 0
    stale = tmp_path / "stale"
    shutil.copytree(COMMITTED, stale)
    shutil.copy(COMMITTED / "alg1_step3_warp.png", stale / "alg1_step4_ddpm_forward.png")
    assert method_figures.main(["--check", "--out", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "alg1_step4_ddpm_forward.png" in err and "alg1_step3_warp.png" not in err


@pytest.mark.parametrize("change, figures", [
    ("seed=3", ["alg1_step1_2_first_frame", "alg1_step6_frames", "cross_frame_attention", "background_smoothing"]),
    ("method.alpha=0.5", ["background_smoothing"]),
], ids=["another-seed", "another-alpha"])
def test_the_tolerance_refuses_a_real_change(change, figures, tmp_path, monkeypatch):
    """The same figures from runs with one override changed (the seed; background smoothing's α, 0.6 → 0.5) all
    differ beyond the tolerance from the committed ones."""
    key = change.split("=")[0]
    runs = {run: tuple(o for o in options if not o.startswith(f"{key}=")) + (change,)
            for run, options in method_figures.RUNS.items()}
    monkeypatch.setattr(method_figures, "RUNS", runs)
    for path in method_figures.make(tmp_path, figures):
        ok, what = method_figures.compare(COMMITTED / path.name, path)
        assert not ok, f"{path.name} made with {change} passes as the committed one: {what}"

"""experiments/report.py and t2vz.experiment.report on a fake multirun folder (no model): per-job and per-setting tables
(means and stds over ok jobs only, the failed job listed), PNG plots, the frame sheet, the empty-folder error."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2vz.experiment.report import LABEL_WIDTH, PAD, PLOT_SIZE, ReportError, write_report

REPO = Path(__file__).resolve().parents[1]
STRENGTHS, SEEDS = (0, 12, 24), (0, 1)
FAILED_JOB = 5  # motion_strength=24, seed=1
FRAME_SHAPE = (4, 16, 20, 3)


def colour(job: int) -> tuple[int, int, int]:
    return (40 * job + 10, 200 - 30 * job, 90)


def metrics_of(strength: int, seed: int) -> dict[str, float]:
    return {"warp_error": 0.1 + strength / 100 + 0.03 * seed, "clip_score": 0.3 - strength / 1000 + 0.01 * seed}


def make_multirun(root: Path, key: str = "method.motion_strength", values=STRENGTHS) -> Path:
    """Job folders 0..5 as run_experiment writes them: metrics.json, frames.npz, video_sheet.png, config.yaml."""
    root.mkdir(parents=True)
    for job, (value, seed) in enumerate((v, s) for v in values for s in SEEDS):
        folder = root / str(job)
        folder.mkdir()
        overrides = ["model=models/tiny", f"{key}={str(value).lower()}", f"seed={seed}", "prompt=a horse"]
        record: dict = {"overrides": overrides, "status": "ok"}
        if job == FAILED_JOB:
            record.update(status="failed", error="method.motion_strength=24 broke")
        else:
            record.update(metrics_of(value if isinstance(value, int) else job, seed))
            frames = np.zeros(FRAME_SHAPE, np.uint8)
            frames[:] = colour(job)
            frames[-1, :, :, 0] = 255  # the last frame differs from the first
            np.savez_compressed(folder / "frames.npz", frames=frames[None] if job == 2 else frames)  # 2: a batch
            Image.fromarray(frames[0]).save(folder / "video_sheet.png")
        (folder / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        (folder / "config.yaml").write_text(f"seed: {seed}\n")
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sweep = make_multirun(tmp_path_factory.mktemp("multirun") / "sweep")
    return sweep, write_report(sweep)


def test_per_job_table_lists_every_job_and_the_failure(report):
    sweep, paths = report
    assert sweep / "report.csv" in paths and sweep / "report.md" in paths
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert list(rows[0]) == ["job", "method.motion_strength", "seed", "warp_error", "clip_score", "status", "error"]
    assert [r["job"] for r in rows] == [str(i) for i in range(6)]
    assert rows[FAILED_JOB]["status"] == "failed" and rows[FAILED_JOB]["error"] == "method.motion_strength=24 broke"
    assert rows[FAILED_JOB]["warp_error"] == "" and rows[1]["warp_error"] == pytest.approx(
        repr(metrics_of(0, 1)["warp_error"]))
    md = (sweep / "report.md").read_text().splitlines()
    assert md[0] == "| job | method.motion_strength | seed | warp_error | clip_score | status | error |"
    assert len(md) == 2 + 6 and "| failed | method.motion_strength=24 broke |" in md[2 + FAILED_JOB]


def test_by_setting_means_and_stds_over_ok_jobs_only(report):
    sweep, _ = report
    rows = list(csv.DictReader((sweep / "report_by_setting.csv").open()))
    assert [r["method.motion_strength"] for r in rows] == ["0", "12", "24"]
    assert [(r["n_jobs"], r["n_ok"]) for r in rows] == [("2", "2"), ("2", "2"), ("2", "1")]
    for row, strength in zip(rows, STRENGTHS):
        ok_seeds = SEEDS if strength != 24 else (0,)  # job 5 failed: counted, never averaged
        for metric in ("warp_error", "clip_score"):
            values = [metrics_of(strength, s)[metric] for s in ok_seeds]
            assert float(row[f"{metric}_mean"]) == pytest.approx(np.mean(values))
            if len(values) > 1:
                assert float(row[f"{metric}_std"]) == pytest.approx(np.std(values, ddof=1))
            else:
                assert row[f"{metric}_std"] == ""
    assert [r["status"] for r in rows] == ["ok", "ok", "1/2 ok"]
    assert "job 5: method.motion_strength=24 broke" in rows[2]["error"]
    md = (sweep / "report_by_setting.md").read_text().splitlines()
    assert len(md) == 2 + 3 and md[0].startswith("| method.motion_strength | n_jobs | n_ok | warp_error_mean |")
    assert f"| {np.mean([metrics_of(12, s)['warp_error'] for s in SEEDS]):.4g} |" in md[3]


def test_line_plots_per_metric_and_numeric_key(report):
    sweep, paths = report
    for metric in ("warp_error", "clip_score"):
        path = sweep / f"plot_{metric}_vs_method.motion_strength.png"
        assert path in paths
        image = np.asarray(Image.open(path).convert("RGB"))
        assert image.shape == (PLOT_SIZE[1], PLOT_SIZE[0], 3)
        assert (image < 128).mean() > 0.002 and (image == 255).all(-1).mean() > 0.5  # drawn on, mostly white
    assert not list(sweep.glob("plot_*_vs_seed.png")) and not list(sweep.glob("plot_*_vs_prompt.png"))


def test_frames_sheet_one_row_per_setting(report):
    sweep, _ = report
    sheet = np.asarray(Image.open(sweep / "frames_by_setting.png").convert("RGB"))
    row_height = 64  # FRAME_ROW_MIN_HEIGHT; the 16-pixel frames are scaled up to it
    assert sheet.shape[0] == 3 * row_height + 2 * PAD
    for setting, first_ok_job in enumerate((0, 2, 4)):
        middle = setting * (row_height + PAD) + row_height // 2
        assert tuple(sheet[middle, LABEL_WIDTH + 5]) == colour(first_ok_job)  # its first frame
        last = sheet[middle, LABEL_WIDTH + sheet.shape[1] - LABEL_WIDTH - 5]
        assert last[0] == 255  # the last frame is the right-hand tile
        assert (sheet[setting * (row_height + PAD):, :LABEL_WIDTH][:row_height] < 100).any()  # a label


def test_string_and_boolean_keys_get_bar_charts(tmp_path):
    sweep = make_multirun(tmp_path / "components", "method.cross_frame", ("first", "none", "all"))
    paths = write_report(sweep, tmp_path / "out")
    bar = np.asarray(Image.open(tmp_path / "out" / "plot_warp_error_vs_method.cross_frame.png").convert("RGB"))
    assert bar.shape == (PLOT_SIZE[1], PLOT_SIZE[0], 3)
    assert (bar == (31, 119, 180)).all(-1).sum() > 2000  # filled bars, not a thin line
    assert not list(sweep.glob("plot_*")) and len(paths) == 2 + 2 + 2 + 2 + 1  # tables, paired, plots, sheet
    sweep = make_multirun(tmp_path / "dynamics", "method.motion_dynamics", (True, False, True))
    write_report(sweep)
    assert (sweep / "plot_clip_score_vs_method.motion_dynamics.png").is_file()


def ablation_metric(cross_frame: str, dynamics: bool, seed: int, prompt: str) -> float:
    """A colour shift whose seed and prompt move both settings alike (large), with a cross-frame effect that
    depends on motion dynamics and the seed (small): what pairing is for."""
    effect = {True: (-0.3, 0.1, -0.5, -0.1), False: (0.2, -0.4, 0.6, 0.0)}[dynamics][seed]
    return 5.0 + 3.0 * seed + (2.0 if prompt == "b" else 0.0) + (effect if cross_frame == "off" else 0.0)


def test_paired_differences_match_jobs_on_seed_and_prompt(tmp_path):
    sweep = tmp_path / "ablation"
    grid = [(cf, md, seed, prompt) for md in (True, False) for cf in ("first", "off") for seed in range(4)
            for prompt in ("a", "b")]
    failed = grid.index(("off", True, 2, "b"))  # its partner (first, True, 2, b) stays unpaired
    for job, (cf, md, seed, prompt) in enumerate(grid):
        (sweep / str(job)).mkdir(parents=True)
        overrides = [f"method.cross_frame={cf}", f"method.motion_dynamics={str(md).lower()}", f"seed={seed}",
                     f"prompt={prompt}"]
        record = ({"overrides": overrides, "status": "failed", "error": "boom"} if job == failed else
                  {"overrides": overrides, "status": "ok", "colour_shift": ablation_metric(cf, md, seed, prompt)})
        (sweep / str(job) / "metrics.json").write_text(json.dumps(record))
    assert sweep / "report_paired.csv" in write_report(sweep)
    rows = list(csv.DictReader((sweep / "report_paired.csv").open()))
    assert list(rows[0]) == ["key", "value", "baseline", "fixed", "metric", "n_pairs", "diff_mean", "diff_se",
                             "n_higher", "n_lower"]
    cross = {r["fixed"]: r for r in rows if r["key"] == "method.cross_frame"}
    for md, row in ((True, cross["method.motion_dynamics=True"]), (False, cross["method.motion_dynamics=False"])):
        expected = [ablation_metric("off", md, s, p) - ablation_metric("first", md, s, p)
                    for s in range(4) for p in ("a", "b") if not (md and (s, p) == (2, "b"))]
        assert (row["value"], row["baseline"], row["metric"]) == ("off", "first", "colour_shift")
        assert int(row["n_pairs"]) == len(expected) == (7 if md else 8)
        assert float(row["diff_mean"]) == pytest.approx(np.mean(expected), abs=1e-12)
        assert float(row["diff_se"]) == pytest.approx(np.std(expected, ddof=1) / np.sqrt(len(expected)), abs=1e-12)
        assert (int(row["n_higher"]), int(row["n_lower"])) == (sum(d > 1e-9 for d in expected),
                                                               sum(d < -1e-9 for d in expected))
    # the per-setting std carries the seed's and prompt's spread (about 3.5), the pairs only the effect's
    by_setting = list(csv.DictReader((sweep / "report_by_setting.csv").open()))
    assert min(float(r["colour_shift_std"]) for r in by_setting) > 3.0 > 10 * float(cross["method.motion_dynamics=True"]["diff_se"])
    dynamics = [r for r in rows if r["key"] == "method.motion_dynamics"]
    assert [(r["value"], r["baseline"], r["fixed"]) for r in dynamics] == [
        ("False", "True", "method.cross_frame=first"), ("False", "True", "method.cross_frame=off")]
    assert "| key | value | baseline |" in (sweep / "report_paired.md").read_text()


def test_a_folder_without_jobs_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="no job results"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match="not a folder"):
        write_report(tmp_path / "nope")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / "report.py"), *args], text=True,
                          capture_output=True, timeout=120)


def test_the_script_end_to_end(tmp_path):
    sweep = make_multirun(tmp_path / "sweep")
    proc = run_script(str(sweep), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    written = [Path(line.removeprefix("wrote ")) for line in proc.stdout.splitlines()]
    assert {p.name for p in written} >= {"report.csv", "report.md", "report_by_setting.csv", "report_by_setting.md",
                                         "plot_warp_error_vs_method.motion_strength.png", "frames_by_setting.png"}
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in written)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left
    empty = run_script(str(tmp_path / "empty_out_of_nothing"))
    (tmp_path / "empty").mkdir()
    proc = run_script(str(tmp_path / "empty"))
    for p in (empty, proc):
        assert p.returncode == 2 and "report: error:" in p.stderr and "Traceback" not in p.stderr
    assert "no job results" in proc.stderr

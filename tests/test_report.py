"""experiments/report.py and t2vz.experiment.report on fake multirun folders (no model): per-job and per-setting tables
(means, stds and 95% intervals over ok jobs only, the failed job listed, skipped jobs counted apart), the paired
differences, the paper's table layout, the CLIP model named under every table, PNG plots, the frame sheet, the
empty-folder error, and the t quantile against printed tables."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2vz.experiment import report as report_module
from t2vz.experiment.report import (LABEL_WIDTH, PAD, PLOT_SIZE, ReportError, t_cdf, t_interval, t_quantile,
                                    write_report)

REPO = Path(__file__).resolve().parents[1]
# t_{0.975, df}, the two-sided 95% critical values of Student's t as printed in t tables (4 decimals)
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 9: 2.2622, 29: 2.0452, 100: 1.9840,
        10000: 1.9602}
STRENGTHS, SEEDS = (0, 12, 24), (0, 1)
FAILED_JOB = 5  # motion_strength=24, seed=1
FRAME_SHAPE = (4, 16, 20, 3)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


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
    rows = read_csv(sweep / "report.csv")
    assert list(rows[0]) == ["job", "method.motion_strength", "seed", "warp_error", "clip_score", "status", "error"]
    assert [r["job"] for r in rows] == [str(i) for i in range(6)]
    assert rows[FAILED_JOB]["status"] == "failed" and rows[FAILED_JOB]["error"] == "method.motion_strength=24 broke"
    assert rows[FAILED_JOB]["warp_error"] == "" and rows[1]["warp_error"] == pytest.approx(
        repr(metrics_of(0, 1)["warp_error"]))
    md = (sweep / "report.md").read_text().splitlines()
    assert md[0] == "| job | method.motion_strength | seed | warp_error | clip_score | status | error |"
    assert md[2 + 6] == "" and "| failed | method.motion_strength=24 broke |" in md[2 + FAILED_JOB]
    # under the table: the CLIP model (these jobs have a clip_score but name no model), then the job counts
    assert md[2 + 6 + 1].startswith("CLIP model: not recorded") and md[-1] == "6 jobs: 5 ok, 1 failed, 0 skipped."


def test_by_setting_means_and_stds_over_ok_jobs_only(report):
    sweep, _ = report
    rows = read_csv(sweep / "report_by_setting.csv")
    assert [r["method.motion_strength"] for r in rows] == ["0", "12", "24"]
    assert [(r["n_jobs"], r["n_ok"], r["n_failed"], r["n_skipped"]) for r in rows] == [
        ("2", "2", "0", "0"), ("2", "2", "0", "0"), ("2", "1", "1", "0")]
    for row, strength in zip(rows, STRENGTHS):
        ok_seeds = SEEDS if strength != 24 else (0,)  # job 5 failed: counted, never averaged
        for metric in ("warp_error", "clip_score"):
            values = [metrics_of(strength, s)[metric] for s in ok_seeds]
            assert float(row[f"{metric}_mean"]) == pytest.approx(np.mean(values))
            if len(values) > 1:
                assert float(row[f"{metric}_std"]) == pytest.approx(np.std(values, ddof=1))
                # two seeds: t_{0.975, 1} · s / √2
                assert float(row[f"{metric}_ci95"]) == pytest.approx(
                    T975[1] * np.std(values, ddof=1) / np.sqrt(2), rel=1e-5)
            else:
                assert row[f"{metric}_std"] == "" and row[f"{metric}_ci95"] == ""
    assert [r["status"] for r in rows] == ["ok", "ok", "1/2 ok"]
    assert "job 5: method.motion_strength=24 broke" in rows[2]["error"]
    md = (sweep / "report_by_setting.md").read_text().splitlines()
    assert md[2 + 3] == "" and md[0].startswith(
        "| method.motion_strength | n_jobs | n_ok | n_failed | n_skipped | warp_error_mean | warp_error_std | "
        "warp_error_ci95 |")
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
    assert not list(sweep.glob("plot_*")) and len(paths) == 2 + 2 + 2 + 2 + 2 + 1  # tables, paired, paper, plots, sheet
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
    rows = read_csv(sweep / "report_paired.csv")
    assert list(rows[0]) == ["key", "value", "baseline", "fixed", "metric", "n_pairs", "diff_mean", "diff_se",
                             "diff_ci95", "n_higher", "n_lower"]
    cross = {r["fixed"]: r for r in rows if r["key"] == "method.cross_frame"}
    for md, row in ((True, cross["method.motion_dynamics=True"]), (False, cross["method.motion_dynamics=False"])):
        expected = [ablation_metric("off", md, s, p) - ablation_metric("first", md, s, p)
                    for s in range(4) for p in ("a", "b") if not (md and (s, p) == (2, "b"))]
        assert (row["value"], row["baseline"], row["metric"]) == ("off", "first", "colour_shift")
        assert int(row["n_pairs"]) == len(expected) == (7 if md else 8)
        assert float(row["diff_mean"]) == pytest.approx(np.mean(expected), abs=1e-12)
        se = np.std(expected, ddof=1) / np.sqrt(len(expected))
        assert float(row["diff_se"]) == pytest.approx(se, abs=1e-12)
        assert float(row["diff_ci95"]) == pytest.approx(T975[len(expected) - 1] * se, rel=1e-4)  # 7 pairs: df 6
        assert (int(row["n_higher"]), int(row["n_lower"])) == (sum(d > 1e-9 for d in expected),
                                                               sum(d < -1e-9 for d in expected))
    # the per-setting std carries the seed's and prompt's spread (about 3.5), the pairs only the effect's
    by_setting = read_csv(sweep / "report_by_setting.csv")
    assert min(float(r["colour_shift_std"]) for r in by_setting) > 3.0 > 10 * float(cross["method.motion_dynamics=True"]["diff_se"])
    dynamics = [r for r in rows if r["key"] == "method.motion_dynamics"]
    assert [(r["value"], r["baseline"], r["fixed"]) for r in dynamics] == [
        ("False", "True", "method.cross_frame=first"), ("False", "True", "method.cross_frame=off")]
    paired_md = (sweep / "report_paired.md").read_text()
    assert "| key | value | baseline |" in paired_md
    assert "\n\nno CLIP model: the jobs have no CLIP metrics\n" in paired_md and "paired on seed, prompt" in paired_md
    assert not (sweep / "report_paper.md").exists()  # no clip_score, no textual_faithfulness: no paper table


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
    lines = proc.stdout.splitlines()
    assert lines[0] == "report: 6 jobs: 5 ok, 1 failed, 0 skipped"
    written = [Path(line.removeprefix("wrote ")) for line in lines[1:]]
    assert all(line.startswith("wrote ") for line in lines[1:])
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


# ---- the t quantile and the intervals ------------------------------------------------------------------------

@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-T975[df], abs=1e-4)  # symmetric
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-12)


def test_t_quantile_against_closed_forms():
    # df 1 is the Cauchy distribution, df 2 has F(t) = 1/2 + t / (2 √(2 + t²))
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(np.tan(np.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) * np.sqrt(2 / (1 - (2 * p - 1) ** 2)), rel=1e-9)
    assert t_quantile(0.5, 7) == 0.0
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_t_interval_is_the_hand_formula_and_drops_non_finite_values():
    values = [3.0, 5.5, 4.0, float("nan"), 6.0, None, float("inf"), 4.5]  # five finite values: df 4
    mean, half, n = t_interval(values)
    finite = [3.0, 5.5, 4.0, 6.0, 4.5]
    assert n == 5 and mean == pytest.approx(np.mean(finite))
    assert half == pytest.approx(T975[4] * np.std(finite, ddof=1) / np.sqrt(5), rel=1e-4)
    mean, half, n = t_interval([2.5, float("nan")])
    assert (mean, n) == (2.5, 1) and np.isnan(half)  # no interval from one value
    mean, half, n = t_interval([])
    assert n == 0 and np.isnan(mean) and np.isnan(half)


# ---- paper-style sweeps: CLIP metrics, clip_model, skipped jobs, +ablation, pairs ---------------------------------

def write_jobs(root: Path, records: list[dict]) -> Path:
    """One job folder per record (metrics.json only: the report draws "no frames" for them)."""
    for job, record in enumerate(records):
        (root / str(job)).mkdir(parents=True)
        (root / str(job) / "metrics.json").write_text(json.dumps(record))
    return root


ABLATIONS, PROMPTS, T2V_SEEDS = ("t2v_zero", "no_cross_frame_attention", "no_motion_dynamics"), ("a", "b"), (0, 1, 2)
CLIP_PATH = "/data/models/clip-vit-large-patch14"


def t2v_metrics(ablation: str, prompt: str, seed: int) -> dict[str, float]:
    a = ABLATIONS.index(ablation)
    return {"clip_score": 31.0 - a + (0.7 if prompt == "b" else 0.0) + 0.3 * seed ** 2,
            "frame_consistency": 95.0 - 2 * a + 0.5 * seed - (0.2 if prompt == "b" else 0.0)}


def t2v_sweep(root: Path, clip_model: str | None = CLIP_PATH) -> Path:
    """The text-to-video ablation as the paper's sweep runs it: +ablation=… × prompts × seeds."""
    records = []
    for ablation in ABLATIONS:
        for prompt in PROMPTS:
            for seed in T2V_SEEDS:
                record = {"overrides": ["model=models/sd15", f"+ablation={ablation}", f"prompt={prompt}",
                                        f"seed={seed}"], "status": "ok", **t2v_metrics(ablation, prompt, seed),
                          "warp_error": 0.1 * seed}
                if clip_model is not None:
                    record["clip_model"] = clip_model
                records.append(record)
    return write_jobs(root, records)


def test_paper_table_of_a_text_to_video_ablation(tmp_path):
    sweep = t2v_sweep(tmp_path / "t2v")
    paths = write_report(sweep)
    assert sweep / "report_paper.md" in paths and sweep / "report_paper.csv" in paths
    # the setting is reported as "ablation", not "+ablation"; prompt and seed are averaged over
    by_setting = read_csv(sweep / "report_by_setting.csv")
    assert [r["ablation"] for r in by_setting] == sorted(ABLATIONS) and "+ablation" not in by_setting[0]
    assert all(r["n_ok"] == "6" for r in by_setting)
    assert (sweep / "plot_clip_score_vs_ablation.png").is_file()
    md = (sweep / "report_paper.md").read_text().splitlines()
    assert md[0] == "# Text-to-video, in the layout of Text2Video-Zero's Table 1 (Khachatryan et al. 2023)"
    assert md[2] == "| ablation | n | CLIP score | Frame consistency |"
    assert [line.split(" | ")[0] for line in md[4:7]] == [f"| {a}" for a in ABLATIONS]  # in the sweep's order
    for line, ablation in zip(md[4:7], ABLATIONS):
        cells = [t2v_metrics(ablation, p, s) for p in PROMPTS for s in T2V_SEEDS]
        expected = []
        for metric in ("clip_score", "frame_consistency"):
            x = [c[metric] for c in cells]  # six videos: df 5
            expected.append(f"{np.mean(x):.2f} ± {T975[5] * np.std(x, ddof=1) / np.sqrt(6):.2f}")
        assert line == f"| {ablation} | 6 | {expected[0]} | {expected[1]} |"
    notes = md[8:]
    assert f"CLIP model of the CLIP metrics: {CLIP_PATH}" in notes and "toy CLIP" not in "\n".join(notes)
    assert any("95% Student-t interval" in n and "(prompts × seeds)" in n for n in notes)
    paper_csv = read_csv(sweep / "report_paper.csv")
    assert list(paper_csv[0]) == ["ablation", "n", "clip_score_mean", "clip_score_ci95", "frame_consistency_mean",
                                  "frame_consistency_ci95"]
    row = {r["ablation"]: r for r in by_setting}["no_motion_dynamics"]
    assert float(paper_csv[2]["clip_score_ci95"]) == pytest.approx(float(row["clip_score_ci95"]))


def test_clip_model_is_named_under_every_table_and_never_a_metric(tmp_path):
    toy = write_report(t2v_sweep(tmp_path / "toy", clip_model="toyworld"), tmp_path / "toy_report")
    path = write_report(t2v_sweep(tmp_path / "path"), tmp_path / "path_report")
    none = write_report(t2v_sweep(tmp_path / "none", clip_model=None), tmp_path / "none_report")
    without = write_report(make_multirun(tmp_path / "plain", values=(0, 12, 24)), tmp_path / "plain_report")
    toy_line = ("CLIP model of the CLIP metrics: toyworld (t2vz's toy CLIP, trained on the toy world: its scores "
                "rank toy-world videos and are not comparable with published CLIP scores)")
    for paths, line in ((toy, toy_line), (path, f"CLIP model of the CLIP metrics: {CLIP_PATH}"),
                        (none, "CLIP model: not recorded in the jobs' metrics.json (they have CLIP metrics, "
                               "but no clip_model)")):
        tables = [p for p in paths if p.suffix == ".md"]
        assert {p.name for p in tables} == {"report.md", "report_by_setting.md", "report_paired.md", "report_paper.md"}
        for table in tables:
            text = table.read_text()
            assert f"|\n\n{line}\n" in text, table  # right under the table, a paragraph of its own
    # a sweep with no CLIP metric at all
    plain = tmp_path / "plain2"
    write_jobs(plain, [{"overrides": [f"method.motion_strength={v}", f"seed={s}"], "status": "ok",
                        "warp_error": 0.1 * v + s} for v in (0, 12) for s in (0, 1)])
    for table in (p for p in write_report(plain) if p.suffix == ".md"):
        assert "|\n\nno CLIP model: the jobs have no CLIP metrics\n" in table.read_text(), table
    assert any(p.name == "report_paper.md" for p in without)  # a clip_score without clip_model: still a table
    # clip_model is a per-job column of report.csv, never averaged or plotted
    out = tmp_path / "toy_report"
    jobs = read_csv(out / "report.csv")
    assert all(r["clip_model"] == "toyworld" for r in jobs)
    header = list(read_csv(out / "report_by_setting.csv")[0])
    assert not [c for c in header if c.startswith("clip_model")]
    paired = read_csv(out / "report_paired.csv")
    assert {r["metric"] for r in paired} == {"clip_score", "frame_consistency", "warp_error"}
    assert not list(out.glob("plot_clip_model*"))


EDITING_METHODS = ("video_instruct_pix2pix", "framewise_instruct_pix2pix", "tune_a_video")
PAIRS, EDIT_SEEDS = (0, 1, 2), (0, 1)
SKIP_REASON = "framewise_instruct_pix2pix needs an InstructPix2Pix model (model= is a text-to-image model)"


def edit_metrics(method: str, pair: int, seed: int) -> dict[str, float]:
    m = EDITING_METHODS.index(method)
    return {"frame_consistency": 90.0 + m + 1.5 * pair + 0.25 * seed ** 2 + 0.1 * pair * seed,
            "textual_faithfulness": 28.0 + 0.5 * m - pair + 0.4 * seed, "clip_score": 25.0 + pair}


def test_editing_sweep_with_skipped_jobs_and_pairs(tmp_path, monkeypatch):
    records = []
    for method in EDITING_METHODS:
        for pair in PAIRS:
            for seed in EDIT_SEEDS:
                overrides = ["+experiment=editing/compare", f"method={method}", f"pair={pair}", f"seed={seed}"]
                if method == "framewise_instruct_pix2pix":
                    records.append({"overrides": overrides, "status": "skipped", "error": SKIP_REASON})
                elif (method, pair, seed) == ("tune_a_video", 2, 1):
                    records.append({"overrides": overrides, "status": "failed", "error": "out of memory"})
                else:
                    records.append({"overrides": overrides, "status": "ok", "clip_model": "toyworld",
                                    **edit_metrics(method, pair, seed)})
    sweep = write_jobs(tmp_path / "editing", records)
    drawn = []
    draw_plot = report_module.draw_plot
    monkeypatch.setattr(report_module, "draw_plot", lambda points, *a, **k: drawn.append((points, a)) or draw_plot(
        points, *a, **k))
    paths = write_report(sweep)
    # pair and seed are averaged over: one row per method, skipped jobs counted apart from failed ones
    rows = {r["method"]: r for r in read_csv(sweep / "report_by_setting.csv")}
    assert list(rows) == sorted(EDITING_METHODS) and "pair" not in next(iter(rows.values()))
    assert [(rows[m]["n_jobs"], rows[m]["n_ok"], rows[m]["n_failed"], rows[m]["n_skipped"]) for m in EDITING_METHODS
            ] == [("6", "6", "0", "0"), ("6", "0", "0", "6"), ("6", "5", "1", "0")]
    assert rows["framewise_instruct_pix2pix"]["status"] == "skipped"
    assert rows["framewise_instruct_pix2pix"]["error"] == f"jobs 6, 7, 8, 9, 10, 11 skipped: {SKIP_REASON}"
    assert rows["tune_a_video"]["status"] == "5/6 ok" and rows["tune_a_video"]["error"] == "job 17: out of memory"
    tav = [edit_metrics("tune_a_video", p, s)["textual_faithfulness"] for p in PAIRS for s in EDIT_SEEDS
           if (p, s) != (2, 1)]
    assert float(rows["tune_a_video"]["textual_faithfulness_ci95"]) == pytest.approx(
        T975[4] * np.std(tav, ddof=1) / np.sqrt(5), rel=1e-4)
    # paired on pair and seed: tune_a_video − video_instruct_pix2pix over the five pairs of ok jobs
    paired = {r["metric"]: r for r in read_csv(sweep / "report_paired.csv")
              if r["value"] == "tune_a_video"}
    d = [edit_metrics("tune_a_video", p, s)["frame_consistency"] - edit_metrics("video_instruct_pix2pix", p, s)[
        "frame_consistency"] for p in PAIRS for s in EDIT_SEEDS if (p, s) != (2, 1)]
    row = paired["frame_consistency"]
    assert (row["baseline"], row["n_pairs"]) == ("video_instruct_pix2pix", "5")
    assert float(row["diff_mean"]) == pytest.approx(np.mean(d))
    assert float(row["diff_ci95"]) == pytest.approx(T975[4] * np.std(d, ddof=1) / np.sqrt(5), rel=1e-4)
    # the paper's layout: Tune-A-Video's columns, the skipped method a row with its reason, the failed job noted
    md = (sweep / "report_paper.md").read_text().splitlines()
    assert md[0] == "# Video editing, in the layout of Tune-A-Video's Table 1 (Wu et al. 2023)"
    assert md[2] == "| method | n | Frame consistency | Textual faithfulness | note |"
    assert md[5] == f"| framewise_instruct_pix2pix | 0 | – | – | skipped: {SKIP_REASON} |"
    assert md[6].startswith("| tune_a_video | 5 | ") and md[6].endswith(" | 1 of 6 jobs failed |")
    assert f"{np.mean(tav):.2f} ± {T975[4] * np.std(tav, ddof=1) / np.sqrt(5):.2f}" in md[6]
    assert md[7:] == ["", md[8], "", md[10]]  # under the table: two notes
    assert md[8].startswith("CLIP model of the CLIP metrics: toyworld (t2vz's toy CLIP")
    assert "(pairs × seeds)" in md[10] and md[10].endswith("18 jobs: 11 ok, 1 failed, 6 skipped.")
    # the plots: written, error bars the 95% interval of the ok jobs, and the y label says so
    assert sweep / "plot_textual_faithfulness_vs_method.png" in paths
    points, (title, xlabel, ylabel) = next((p, a[:3]) for p, a in drawn if a[0] == "textual_faithfulness vs method")
    assert ylabel == "textual_faithfulness (mean ± 95% interval)"
    assert {x: h for x, _, h in points}["tune_a_video"] == pytest.approx(
        float(rows["tune_a_video"]["textual_faithfulness_ci95"]))
    assert "framewise_instruct_pix2pix" not in [x for x, _, _ in points]  # nothing measured, nothing drawn


def test_the_script_counts_skipped_jobs(tmp_path):
    sweep = write_jobs(tmp_path / "sweep", [
        {"overrides": ["method=a", "seed=0"], "status": "ok", "frame_consistency": 91.0},
        {"overrides": ["method=b", "seed=0"], "status": "skipped", "error": "needs another model"},
        {"overrides": ["method=a", "seed=1"], "status": "failed", "error": "boom"},
        {"overrides": ["method=b", "seed=1"], "status": "skipped", "error": "needs another model"}])
    proc = run_script(str(sweep))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "report: 4 jobs: 1 ok, 1 failed, 2 skipped"


def test_the_counts_say_what_the_last_run_skipped_as_complete():
    from t2vz.experiment.report import counts_text

    rows = [{"status": "ok", "action": "skipped"}, {"status": "ok", "action": "ran"}, {"status": "failed"},
            {"status": "skipped"}]
    assert counts_text(rows) == "4 jobs: 2 ok (1 ran, 1 skipped as complete), 1 failed, 1 skipped"
    assert counts_text(rows[1:]) == "3 jobs: 1 ok, 1 failed, 1 skipped"  # nothing resumed: as before

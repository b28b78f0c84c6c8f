"""experiments/run.py and conf/: every config composes; a two-point sweep of every ablation runs end to end on a
tiny random model with W&B offline and is read back from its .wandb files; a failing point does not stop a sweep."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import t2vz.experiment.config  # noqa: F401  (registers the ConfigStore nodes)
from t2vz.experiment.config import to_generate_config
from t2vz.experiment.report import write_report
from weights_convert.random_model import write_random_model

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
OTHER_ENTRY_POINTS = {"paper_editing"}  # conf/experiment files of experiments/paper_editing.py, not run.py
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem not in OTHER_ENTRY_POINTS)
ABLATIONS = ["ablate_alpha", "ablate_components", "ablate_components_sd15", "ablate_delta_t", "ablate_lambda",
             "ablate_speed"]
PAPER = ["paper_t2v", "toy_clip_agreement"]  # prompt file × seeds (× the paper's rows), scored by the toy CLIP
SMALL = ["video.num_frames=3", "video.height=32", "video.width=32", "sampler.num_inference_steps=6",
         "method.t0=1", "method.t1=3", "output.progress=false", "output.formats=[mp4]"]
# per ablation: two points of its swept key (the command line replaces the experiment's own sweep of that key)
TWO_POINTS = {
    "ablate_lambda": ["method.motion_strength=0,64"],
    "ablate_delta_t": ["method.delta_t=0,2", "method.t0=null"],
    "ablate_alpha": ["method.alpha=0.0,1.0"],
    "ablate_components": ["method.motion_dynamics=true,false", "method.cross_frame=first"],
    "ablate_components_sd15": ["method.motion_dynamics=true,false", "method.cross_frame=first"],
    "ablate_speed": ["fast.merging_ratio=0.0,0.5", "fast.cache_interval=2"],
    "paper_t2v": ["+ablation=t2v_zero,no_cross_frame_attention"],
    "toy_clip_agreement": ['prompt="a red circle on grass","a purple circle on grass"'],
}
# the toy ablation runs on the shipped toy model with a prompt its judge reads; the others on a random tiny model
TOY = {name: ["model=toyworld", "prompt=a red circle on grass", "video.height=64", "video.width=64"]
       for name in ("ablate_components", "ablate_speed")}
TOY["toy_clip_agreement"] = ["model=toyworld", "video.height=64", "video.width=64"]
HEADLINES = {"ablate_components": "object_same_tone", "ablate_speed": "text_all_ok", "paper_t2v": "clip_score",
             "toy_clip_agreement": "clip_score"}


def compose_experiment(overrides: list[str], hydra: bool = False):
    """The composed experiment config; with `hydra`, including the `hydra` node (sweeper, launcher)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("experiment_config", overrides=overrides, return_hydra_config=hydra)


def test_every_experiment_is_covered():
    assert sorted(TWO_POINTS) == EXPERIMENTS == sorted(ABLATIONS + PAPER)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("logger", ["default", "offline", "disabled"])
def test_every_experiment_and_group_composes(experiment, logger):
    overrides = [f"+experiment={experiment}", f"logger={logger}", "prompt=p", "model=m"]
    config = to_generate_config(compose_experiment(overrides))
    assert config.name == experiment and config.metrics.headline == HEADLINES.get(experiment, "warp_error")
    assert config.logger.enabled == (logger != "disabled")
    swept = compose_experiment(overrides, hydra=True).hydra.sweeper.params
    assert {"prompt", "seed"} <= set(swept)
    if experiment in ABLATIONS:
        assert any(key.startswith(("method.", "fast.")) for key in swept)


def test_experiment_files_declare_their_sweeps():
    import yaml

    for name in ABLATIONS:
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_")
        params = yaml.safe_load(text)["hydra"]["sweeper"]["params"]
        assert {"prompt", "seed"} <= set(params) and len(str(params["seed"]).split(",")) >= 3, name
        assert len(next(v for k, v in params.items() if k.startswith(("method.", "fast."))).split(",")) >= 2, name
        assert max(len(str(v).split(",")) for k, v in params.items() if k.startswith(("method.", "fast."))) >= 4 \
            or name.startswith("ablate_components"), name


def test_paper_sweeps_take_their_prompts_from_the_prompt_file():
    """paper_t2v: the prompt file's 10 prompts × 3 seeds × the paper's three rows; toy_clip_agreement: 16 prompts
    (8 held out) × 13 seeds = 208 videos. The resolver reads the file the config names."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from t2vz.experiment.config import read_prompts
    from t2vz.toyworld.world import HELD_OUT, caption, parse_caption

    def sweep_values(name):
        params = compose_experiment([f"+experiment={name}", "model=m"], hydra=True).hydra.sweeper.params
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
        return {o.get_key_element(): [getattr(v, "text", str(v)) for v in o.sweep_iterator()] for o in parsed}

    t2v = sweep_values("paper_t2v")
    assert t2v["+ablation"] == ["t2v_zero", "no_cross_frame_attention", "no_motion_dynamics"]
    assert len(t2v["prompt"]) == 10 and t2v["seed"] == ["0", "1", "2"]
    assert t2v["prompt"][0] == "a red circle on grass"
    agreement = sweep_values("toy_clip_agreement")
    assert len(agreement["prompt"]) == 16 and len(agreement["seed"]) == 13
    held = {caption(bg, [(c, s)]) for c, s, bg in HELD_OUT}
    assert sum(p in held for p in agreement["prompt"]) == 8
    assert all(parse_caption(p)[0] for p in agreement["prompt"])
    assert read_prompts(str(REPO / "experiments/prompts/toyworld.txt")).count('","') == 9


def test_paper_editing_under_run_py_names_its_script(tmp_path):
    """conf/experiment/paper_editing.yaml belongs to experiments/paper_editing.py: run.py says so in one line."""
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), "-m", "+experiment=paper_editing",
                           "logger=disabled", f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("run python experiments/paper_editing.py -m +experiment=paper_editing")


def test_read_prompts_quotes_for_the_override_parser(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from t2vz.experiment.config import read_prompts

    path = tmp_path / "prompts.txt"
    lines = ["a cat, running", 'say "hi" \\ bye', 'a \\"quoted\\" path\\']
    path.write_text("# a comment\n\n" + "\n".join(f"  {line} " for line in lines) + "\n", encoding="utf-8")
    override = OverridesParser.create().parse_override(f"prompt={read_prompts(str(path))}")
    assert [v.text for v in override.sweep_iterator()] == lines
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_a_missing_prompt_file_ends_the_sweep_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), "-m", "+experiment=paper_t2v",
                           f"prompts={tmp_path / 'missing.txt'}", "logger=disabled",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"t2vz: error: prompts={tmp_path / 'missing.txt'}: no such file; give a text file " \
                                  "with one prompt a line"


def test_typos_fail_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_experiment(["prompt=p", "model=m", "metrics.headlne=x"])
    with pytest.raises(ConfigCompositionException):
        compose_experiment(["prompt=p", "model=m", "logger=nonexistent"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("model") / "tiny")


def run_sweep(tiny_model, sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DISABLE_GIT": "true", "PYTHONPATH": str(REPO)}
    defaults = [d for d in (f"model={tiny_model}", "prompt=a horse galloping")
                if not any(o.startswith(d.split("=")[0] + "=") for o in overrides)]
    args = [sys.executable, str(REPO / "experiments" / "run.py"), "-m", *defaults, "seed=0",
            *SMALL, f"hydra.sweep.dir={sweep_dir}", *overrides]
    return subprocess.run(args, cwd=sweep_dir.parent, env=env, text=True, capture_output=True, timeout=600)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_two_point_sweep_runs_and_logs_to_wandb_offline(tiny_model, tmp_path, experiment):
    from wandb_records import read_offline_run

    sweep = tmp_path / experiment
    proc = run_sweep(tiny_model, sweep, f"+experiment={experiment}", *TWO_POINTS[experiment], *TOY.get(experiment, []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        record = json.loads((job / "metrics.json").read_text())
        assert record["status"] == "ok", record
        assert {"video.mp4", "video_sheet.png", "frames.npz", "config.yaml", "run.json"} <= {
            p.name for p in job.iterdir()}
        logged = read_offline_run(job)
        assert logged["config"]["name"] == experiment
        assert logged["summary"]["warp_error"] == pytest.approx(record["warp_error"])
        if experiment in TOY:  # the toy judge's metrics, logged like the others
            assert {"object_iou", "object_same_shape", "object_same_tone", "text_colour_ok", "motion_error"} <= set(record)
            for key in ("text_shape_ok", "motion_error"):  # always finite (object_iou is NaN without an object)
                assert logged["summary"][key] == pytest.approx(record[key]), key
        assert any(name.endswith(".mp4") for name in logged["files"]), logged["files"]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    written = {p.name for p in write_report(sweep, tmp_path / "report")}
    assert {"report.csv", "report.md", "report_by_setting.csv", "frames_by_setting.png"} <= written
    if experiment != "toy_clip_agreement":  # its two points differ by prompt only: no setting to plot against
        assert any(name.startswith("plot_warp_error_vs_") for name in written), written
        assert "plot_warp_error_vs_generate_s.png" in written  # quality against generation time, a point a setting
    records = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    assert all(r["clip_model"] == "toyworld" and 0 <= r["clip_score"] <= 100 for r in records)  # the default CLIP
    if experiment in PAPER:  # the papers' table, its CLIP model named under it
        paper = (tmp_path / "report" / "report_paper.md").read_text()
        assert "CLIP score" in paper and "toyworld (t2vz's toy CLIP" in paper
    assert all(json.loads((job / "metrics.json").read_text())["generate_s"] > 0 for job in jobs)


def test_a_failing_point_does_not_stop_the_sweep(tiny_model, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_sweep(tiny_model, sweep, "method.motion_strength=nan,12", "logger=disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {job: json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")}
    assert records["0"]["status"] == "failed" and "motion_strength=nan must be a finite number" in \
        records["0"]["error"]
    assert records["1"]["status"] == "ok"
    assert "job 0 failed: method.motion_strength=nan" in proc.stderr
    rows = {r["status"] for r in csv.DictReader((sweep / "summary.csv").open())}
    assert rows == {"ok", "failed"}


@pytest.mark.parametrize("script,args", [
    ("run.py", ["prompt=a red circle on grass", "video.height=63"]),
    ("control_video.py", ["prompt=x", "controlnet=NO_SUCH_FOLDER", "control.video=NO_SUCH.mp4"]),
    ("instruct_video.py", ["instruction=make it snowy", "source.video=NO_SUCH.mp4"]),
])
def test_a_single_failing_job_exits_2(tmp_path, script, args):
    """One job (no -m) that fails is recorded in metrics.json like a sweep's point, and exits with status 2."""
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / script), *args, "logger=disabled",
                           f"hydra.run.dir={tmp_path / 'job'}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "failed:" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "job" / "metrics.json").read_text())["status"] == "failed"
    assert not list((tmp_path / "job").glob("*.mp4"))


def test_a_sweep_waits_for_an_unreachable_wandb_once(tiny_model, tmp_path):
    """logger.mode=online with a key but no W&B server (a closed port on this machine): the first job waits
    logger.init_timeout, warns once, and every job still logs, offline; the second job does not wait again."""
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_API_KEY="x" * 40, WANDB_BASE_URL="http://127.0.0.1:9",
               WANDB_SILENT="true", WANDB_DISABLE_GIT="true", WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"), WANDB_DATA_DIR=str(tmp_path / "wandb_data"))
    sweep = tmp_path / "sweep"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), "-m", f"model={tiny_model}",
                           "prompt=a horse", *SMALL, "seed=0,1", "logger.mode=online", "logger.init_timeout=3",
                           f"hydra.sweep.dir={sweep}"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("W&B could not be reached") == 1, proc.stderr[-3000:]
    assert (sweep / ".wandb_unreachable").is_file()
    for job in ("0", "1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["status"] == "ok"
        assert list((sweep / job / "wandb").glob("offline-run-*")), f"job {job} has no offline run"
    assert wall < 120, f"the sweep took {wall:.0f} s: W&B's wait was not bounded"


def test_image_to_video_sweeps_over_pictures_and_logs_frame_1s_error(tmp_path):
    """`image=a.png,b.png -m` on the toy model: one job per picture (b.png of another size, resized), each with
    `first_frame_error`/`first_frame_psnr` in metrics.json, summary.csv and W&B, the keys in W&B's config and the
    picture among its images."""
    import numpy as np
    from PIL import Image

    from t2vz.toyworld.world import render, sample_scene
    from wandb_records import read_offline_run

    scene = sample_scene(np.random.default_rng(0), background="grass", things=[("red", "circle")])
    Image.fromarray(render(scene)).save(tmp_path / "a.png")
    Image.fromarray(render(scene)).resize((48, 40)).save(tmp_path / "b.png")
    sweep = tmp_path / "sweep"
    proc = run_sweep(None, sweep, *TOY["ablate_speed"], f"image={tmp_path / 'a.png'},{tmp_path / 'b.png'}",
                     "method.inversion_guidance_scale=2.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [Path(r["image"]).name for r in rows] == ["a.png", "b.png"] and all(r["status"] == "ok" for r in rows)
    for job in ("0", "1"):
        record = json.loads((sweep / job / "metrics.json").read_text())
        assert record["first_frame_error"] < 15 and record["first_frame_psnr"] > 18, record  # measured 8.6, 23.4 dB
        run = json.loads((sweep / job / "run.json").read_text())
        assert run["first_frame_error"] == pytest.approx(record["first_frame_error"])
        logged = read_offline_run(sweep / job)
        assert logged["config"]["method"]["inversion_guidance_scale"] == 2.0
        assert Path(logged["config"]["image"]).name == ("a.png", "b.png")[int(job)]
        assert logged["summary"]["first_frame_error"] == pytest.approx(record["first_frame_error"])
        assert any(name.startswith("media/images/image_") for name in logged["files"]), logged["files"]  # the picture
    assert "frame 1 vs image: mean |error|" in proc.stdout

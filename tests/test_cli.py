"""`python -m t2vz` (t2vz/__main__.py, t2vz/experiment/config.py, t2vz/experiment/run.py): the config composes and
rejects typos at composition; real subprocess runs on a random tiny model (32×32, 3 frames, 10 DDIM steps) write the
run folder, repeat themselves under one seed, sweep with -m, explain themselves with --help and end bad input in one
line."""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from hydra import compose, initialize
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import t2vz
from t2vz.experiment.config import GenerateConfig, to_generate_config
from t2vz.method.text2video_zero import TextToVideoZero, VideoOptions
from t2vz.experiment.run import pipeline_kwargs
from t2vz.video_io import read_video
from weights_convert.random_model import write_random_model

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a horse galloping on the street"
SMALL = ["video.height=32", "video.width=32", "video.num_frames=3", "sampler.num_inference_steps=10",
         "method.t0=2", "method.t1=5", "output.progress=false"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_random_model(str(tmp_path_factory.mktemp("model") / "tiny"), "tiny")


def start_t2vz(*overrides: str, cwd: Path) -> subprocess.Popen:
    # One thread: identical numerics in every run, and no OpenMP spin-waiting when runs share the CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "t2vz", *overrides], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_t2vz(*runs: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run `python -m t2vz OVERRIDES` once per list of overrides, all at once; wait for all."""
    procs = [start_t2vz(*overrides, cwd=cwd) for overrides in runs]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def compose_generate(overrides: list[str]):
    with initialize(version_base="1.3", config_path=None):
        return compose("generate", overrides=overrides)


def read_sheet(folder: Path) -> np.ndarray:
    return iio.imread(folder / "video_sheet.png")


# ------------------------------------------------------------------------------------------------ the config
def test_config_composes_and_checks_keys_and_types():
    cfg = compose_generate([f"prompt={PROMPT}", "model=models/sd15", "method.motion_strength=3",
                            "method.direction=[0,1]", "video.chunk_size=4"])
    config = to_generate_config(cfg)
    assert isinstance(config, GenerateConfig)
    assert (config.method.motion_strength, config.method.direction, config.video.chunk_size) == (3.0, [0.0, 1.0], 4)
    assert config.sampler.num_inference_steps == 50 and config.output.formats == ["mp4", "gif"]
    for bad in ("method.lamda=3", "video.num_frames=abc", "sampler.steps=10", "output.fps=fast"):
        with pytest.raises(ConfigCompositionException):
            compose_generate([f"prompt={PROMPT}", "model=m", bad])


@pytest.mark.parametrize("override, message", [
    ("dtype=fp64", "dtype='fp64' is not one of fp32, fp16, bf16"),
    ("method.cross_frame=last", "method.cross_frame='last'"),
    ("method.ddpm_marginal=approx", "method.ddpm_marginal='approx'"),
    ("method.smoothing=blur", "method.smoothing='blur'"),
    ("method.cross_frame_levels=[1,1]", "method.cross_frame_levels=[1, 1] must be distinct UNet levels"),
    ("method.cross_frame_levels=[0] method.cross_frame=off", "method.cross_frame_levels=[0] needs cross-frame"),
    ("output.formats=[mp4,avi]", "output.formats='avi'"),
    ("video.width=100", "video.width=100 must be a positive multiple of 8"),
    ("method.t1=50", "method.t1=50 needs more than sampler.num_inference_steps=50"),
    ("method.inversion_guidance_scale=-1", "method.inversion_guidance_scale=-1.0 must be a finite number >= 0"),
    ("image=NO_SUCH_PICTURE.png", "cannot read image NO_SUCH_PICTURE.png: no such file"),
])
def test_bad_values_fail_before_any_model_loads(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        to_generate_config(compose_generate(["prompt=p", "model=m", *override.split()]))


def test_null_motion_settings_are_the_models_own():
    """method.motion_strength, t0 and t1 left null take the model folder's own, before any weights load: the paper's
    12, 44, 47 for a folder without a "method" entry (or none at all yet), toyworld's 32, 8, 8; given values win,
    and are checked against the filled-in ones."""
    paper = to_generate_config(compose_generate(["prompt=p", "model=models/sd15"])).method
    assert (paper.motion_strength, paper.t0, paper.t1) == (12.0, 44, 47)
    toy = to_generate_config(compose_generate(["prompt=p"])).method
    assert (toy.motion_strength, toy.t0, toy.t1) == (32.0, 8, 8)
    cfg = compose_generate(["prompt=p", "method.t0=5", "method.motion_strength=64"])
    given = to_generate_config(cfg).method
    assert (given.motion_strength, given.t0, given.t1) == (64.0, 5, 8)
    assert (cfg.method.motion_strength, cfg.method.t0, cfg.method.t1) == (64.0, 5, 8)  # filled in place: config.yaml
    with pytest.raises(ValueError, match="method.t0=20 must not exceed method.t1=8"):
        to_generate_config(compose_generate(["prompt=p", "method.t0=20"]))


def test_a_model_folder_sets_its_own_motion_defaults(tiny_model, tmp_path):
    """A "method" entry in t2vz_model.json is what the pipeline uses where a call gives no λ, t0, t1 (the same video
    as passing them); a bad entry fails at load with a message naming it."""
    import shutil

    from t2vz.sd.model_folder import ModelFolderError, method_defaults

    folder = tmp_path / "own"
    shutil.copytree(tiny_model, folder)
    meta_path = folder / "t2vz_model.json"
    meta = json.loads(meta_path.read_text())
    own = {"motion_strength": 128.0, "t0": 2, "t1": 5}  # λ = 128: one latent pixel a frame on 4×4 latents
    meta_path.write_text(json.dumps({**meta, "method": own}))
    pipe = TextToVideoZero.from_pretrained(folder)
    assert pipe.sd.method_defaults == own

    def video(**kwargs):
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_frames=3, height=32, width=32,
                    num_inference_steps=10, progress=False, **kwargs)

    from t2vz.method.text2video_zero import t0_t1_for_steps

    default = video()  # at 10 steps: the folder's t0, t1 (given at 50 steps) moved to the step count
    moved = {**own, **dict(zip(("t0", "t1"), t0_t1_for_steps(own["t0"], own["t1"], 10)))}
    assert (moved["t0"], moved["t1"]) == (0, 1)  # timesteps 41 and 101 at 50 steps → 1 and 101 at 10
    assert torch.equal(default, video(**moved))
    assert not torch.equal(default, video(**{**moved, "motion_strength": 0.0}))
    assert not torch.equal(default, video(**{**moved, "t0": 1}))
    assert method_defaults({}) == {"motion_strength": 12.0, "t0": 44, "t1": 47}
    for bad, message in [({"lambda": 3}, "keys among motion_strength, t0, t1"),
                         ({"t0": 9, "t1": 5}, "integers 0 <= t0 <= t1"),
                         ({"motion_strength": float("nan")}, "finite motion_strength"),
                         ({"t0": True}, "integers 0 <= t0 <= t1")]:
        meta_path.write_text(json.dumps({**meta, "method": bad}))
        with pytest.raises(ModelFolderError, match=message):
            t2vz.load(folder)


def test_every_option_is_a_pipeline_argument():
    """Config field names equal the arguments they feed (`TextToVideoZero.__call__`'s own and the fields of
    `VideoOptions`, its **options), so the mapping is by name with no table."""
    params = {*inspect.signature(TextToVideoZero.__call__).parameters,
              *(f.name for f in dataclasses.fields(VideoOptions))}
    config = GenerateConfig(prompt="p", model="m")
    names = [f.name for group in (config.video, config.sampler, config.method, config.fast)
             for f in dataclasses.fields(group)]
    assert [n for n in names if n not in params] == []
    assert set(pipeline_kwargs(config)) == {*names, "progress"}


# ------------------------------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def first_run(tiny_model, tmp_path_factory):
    """One run with seed 0 and λ = 3 into hydra.run.dir; (its folder, the overrides given, the process)."""
    tmp = tmp_path_factory.mktemp("cli")
    overrides = [f"prompt={PROMPT}", f"model={tiny_model}", *SMALL, "method.motion_strength=3", "seed=0"]
    (proc,) = run_t2vz([*overrides, f"hydra.run.dir={tmp / 'run'}"], cwd=tmp)
    return tmp / "run", overrides, proc


def test_run_writes_videos_config_and_run_json(first_run):
    run_dir, overrides, proc = first_run
    assert proc.returncode == 0, proc.stderr
    assert str(run_dir) in proc.stdout
    names = ["video.mp4", "video.gif", "video_sheet.png"]
    assert {*names, "config.yaml", "run.json"} <= {p.name for p in run_dir.iterdir()}
    assert tuple(read_video(run_dir / "video.mp4").shape) == (3, 32, 32, 3)
    assert read_sheet(run_dir).shape == (66, 66, 3)  # 2×2 tiles of 32 with a 2-pixel gap

    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved == compose_generate(overrides)  # resolved config = the composed overrides, nothing else
    assert saved.method.motion_strength == 3.0 and saved.video.num_frames == 3
    assert saved.sampler.num_inference_steps == 10 and saved.prompt == PROMPT

    info = json.loads((run_dir / "run.json").read_text())
    assert info["t2vz"] == t2vz.__version__ and info["torch"] == torch.__version__
    assert (info["device"], info["dtype"], info["seed"], info["frames"]) == ("cpu", "fp32", 0, [3, 32, 32, 3])
    assert info["outputs"] == names and info["wall_s"] > 0
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == [".hydra"]  # no temporary files left


def test_same_seed_same_video(first_run, tmp_path):
    run_dir, overrides, _ = first_run
    same, other = run_t2vz([*overrides, f"hydra.run.dir={tmp_path / 'same'}"],
                           [*overrides, "seed=1", f"hydra.run.dir={tmp_path / 'other'}"], cwd=tmp_path)
    assert same.returncode == 0 and other.returncode == 0, same.stderr + other.stderr
    np.testing.assert_array_equal(read_sheet(tmp_path / "same"), read_sheet(run_dir))
    assert not np.array_equal(read_sheet(tmp_path / "other"), read_sheet(run_dir))


def test_help(tmp_path):
    (proc,) = run_t2vz(["--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for text in ("prompt=", "model=", "lora=[]", "method.motion_strength=null", "the model's own", "Examples:",
                 "image=null", "method.inversion_guidance_scale=1.0", "image=scene.png",
                 "python -m t2vz prompt=",
                 "python -m t2vz -m ", "outputs/DATE/TIME/", "fp32 | fp16 | bf16"):
        assert text in proc.stdout, text


def test_bad_input_is_one_line_and_exit_code_2(tiny_model, tmp_path):
    cases = {  # overrides → a piece of the message
        f"model={tmp_path / 'no_model'}": "does not exist",
        "video.height=36": "video.height=36",
        "method.t0=6 method.t1=5": "method.t0=6 must not exceed method.t1=5",
        "dtype=fp64": "dtype='fp64'",
        "hydra.run.dir=RUN/inside-a-file": "cannot create the output folder",  # RUN is a file, not a folder
    }
    unwritable = tmp_path / str(len(cases) - 1)  # the last case's RUN: a file where a folder should be
    unwritable.write_text("")
    runs = [[f"prompt={PROMPT}", f"model={tiny_model}", *SMALL, f"hydra.run.dir={tmp_path / str(i)}",
             *case.replace("RUN", str(tmp_path / str(i))).split()] for i, case in enumerate(cases)]
    for (case, message), proc in zip(cases.items(), run_t2vz(*runs, cwd=tmp_path)):
        errors = [line for line in proc.stderr.splitlines() if line.startswith("t2vz: error:")]
        assert proc.returncode == 2, (case, proc.stderr)
        assert len(errors) == 1 and message in errors[0], (case, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout, case
        assert not (tmp_path / str(list(cases).index(case)) / "video.mp4").exists()
    assert unwritable.is_file()


def test_two_point_sweep(tiny_model, tmp_path):
    (proc,) = run_t2vz(["-m", f"prompt={PROMPT}", f"model={tiny_model}", *SMALL, "method.motion_strength=0,64",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for job, strength in (("0", 0.0), ("1", 64.0)):
        folder = tmp_path / "sweep" / job
        assert (folder / "video.mp4").is_file() and (folder / "video_sheet.png").is_file()
        assert OmegaConf.load(folder / "config.yaml").method.motion_strength == strength
    assert not np.array_equal(read_sheet(tmp_path / "sweep" / "0"), read_sheet(tmp_path / "sweep" / "1"))


def test_without_a_model_the_shipped_toy_model_makes_the_video(tmp_path):
    """README's first command: no model= → toyworld at its own 64×64, mp4 + gif + contact sheet."""
    run_dir = tmp_path / "run"
    (proc,) = run_t2vz(["prompt=a red circle on grass", "video.num_frames=3", "sampler.num_inference_steps=10",
                        "method.t0=6", "method.t1=8", "output.progress=false", f"hydra.run.dir={run_dir}"],
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = {p.name for p in run_dir.iterdir()}
    assert {"video.mp4", "video.gif", "video_sheet.png", "config.yaml", "run.json"} <= written
    assert "model: toyworld" in (run_dir / "config.yaml").read_text()
    assert iio.imread(run_dir / "video.gif").shape[1:3] == (64, 64)


def test_no_prompt_is_one_line_with_an_example(tmp_path):
    (proc,) = run_t2vz([f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2 and "no prompt given" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_goes_on_past_a_failed_point_and_fails_only_when_all_did(tmp_path):
    """`python -m t2vz -m`: a bad point writes error.txt and the others run (exit 0); all bad: exit 2."""
    common = ["-m", "prompt=a red circle on grass", "video.num_frames=2", "sampler.num_inference_steps=2",
              "method.t0=1", "method.t1=1", "output.progress=false", "output.formats=[gif]"]
    one_bad = subprocess.run([sys.executable, "-m", "t2vz", *common, "video.height=64,63",
                              f"hydra.sweep.dir={tmp_path / 'one'}"], capture_output=True, text=True)
    assert one_bad.returncode == 0, one_bad.stderr
    assert (tmp_path / "one" / "0" / "video.gif").is_file()
    assert "video.height=63" in (tmp_path / "one" / "1" / "error.txt").read_text()
    assert not list((tmp_path / "one" / "1").glob("video*")) and "Traceback" not in one_bad.stderr
    all_bad = subprocess.run([sys.executable, "-m", "t2vz", *common, "video.height=63,65",
                              f"hydra.sweep.dir={tmp_path / 'all'}"], capture_output=True, text=True)
    assert all_bad.returncode == 2 and "all 2 jobs of the sweep failed" in all_bad.stderr
    assert "Traceback" not in all_bad.stderr


@pytest.mark.parametrize("steps,t0,t1", [(20, 18, 19), (25, 22, 24), (30, 27, 28)])
def test_t0_t1_follow_the_step_count(tiny_model, tmp_path, steps, t0, t1):
    """Without method.t0/t1, a converted SD 1.5 model runs at fewer steps: the warp lands on the timesteps nearest
    the paper's T₁ = 941, T₀ = 881, and config.yaml and run.json record the t0, t1 used."""
    overrides = [f"prompt={PROMPT}", f"model={tiny_model}", "video.height=32", "video.width=32",
                 "video.num_frames=2", f"sampler.num_inference_steps={steps}", "output.progress=false",
                 "output.formats=[gif]", f"hydra.run.dir={tmp_path / 'run'}"]
    (proc,) = run_t2vz(overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]
    assert (saved["t0"], saved["t1"]) == (t0, t1)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["method"] == {
        "motion_strength": 12.0, "t0": t0, "t1": t1}


def test_t0_t1_for_steps_lands_on_the_nearest_timesteps():
    from t2vz.method.text2video_zero import motion_timesteps, t0_t1_for_steps
    from t2vz.sd.schedulers import DDIM
    assert t0_t1_for_steps(44, 47, 50) == (44, 47)  # the paper's, unchanged: parity with the references holds
    for steps in (10, 20, 25, 30, 100):
        timesteps = DDIM(steps).timesteps
        T1, T0 = motion_timesteps(timesteps, *t0_t1_for_steps(44, 47, steps))
        assert abs(T1 - 941) == min(abs(int(t) - 941) for t in timesteps)
        assert abs(T0 - 881) == min(abs(int(t) - 881) for t in timesteps)
    assert t0_t1_for_steps(8, 8, 20) == (3, 3)  # the toy model's own step 8 (T = 161) → 151 at 20 steps
    assert t0_t1_for_steps(44, 60, 20) == (44, 60)  # not steps of the 50-step list: left for the error to name


@pytest.mark.parametrize("own", [(8, 8), (44, 47)])  # the toy model's own t0, t1 and SD 1.5's (the paper's)
def test_the_models_own_t0_t1_are_valid_at_every_step_count(own):
    """Moved to any step count DDIM accepts from 2 (at most 999 with SD 1.5's offset 1), a model's own t0 ≤ t1
    stay valid: 1 ≤ t1 ≤ steps − 1 (the last step denoises every frame), 0 ≤ t0 ≤ t1, and Δt = 0 stays 0. The toy
    model's step 8 (T = 161) is nearest the last step at 2 and 3 steps: t1 = 1 there."""
    from t2vz.method.text2video_zero import t0_t1_for_steps

    for steps in range(2, 1000):
        t0, t1 = t0_t1_for_steps(*own, steps)
        assert 1 <= t1 <= steps - 1 and 0 <= t0 <= t1, (steps, t0, t1)
        assert t0 == t1 or own[0] != own[1], (steps, t0, t1)  # Δt = 0 stays 0
    assert t0_t1_for_steps(8, 8, 2) == (1, 1) == t0_t1_for_steps(8, 8, 3)
    assert t0_t1_for_steps(44, 47, 2) == (1, 1) and t0_t1_for_steps(44, 47, 3) == (2, 2)  # 667: nearest 881, 941


@pytest.mark.parametrize("steps", [2, 3])
def test_the_toy_model_runs_at_two_and_three_steps_on_its_own_defaults(tmp_path, steps):
    (proc,) = run_t2vz([f"prompt=a red circle on grass", f"sampler.num_inference_steps={steps}", "video.num_frames=2",
                        "output.progress=false", "output.formats=[gif]", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["method"] == {
        "motion_strength": 32.0, "t0": 1, "t1": 1}


@pytest.mark.parametrize("model", ["toyworld", "tiny"])  # the toy model's own t0, t1; SD 1.5's (a random SD 1.5)
@pytest.mark.parametrize("bad,named", [("method.cross_frame=bogus", "method.cross_frame='bogus'"),
                                       ("dtype=fp8", "dtype='fp8'"), ("method.smoothing=blur", "method.smoothing")])
def test_a_bad_option_is_named_at_two_steps(tiny_model, bad, named, model):
    """At 2 steps the model's own t0, t1 are valid, so the bad option on the same line is what the error names."""
    proc = subprocess.run([sys.executable, "-m", "t2vz", "prompt=x", f"model={tiny_model if model == 'tiny' else model}",
                           "sampler.num_inference_steps=2", bad], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-2000:]
    assert "method.t1" not in proc.stderr and "Traceback" not in proc.stderr


def test_pipeline_t0_t1_follow_the_step_count(tiny_model):
    """TextToVideoZero without t0/t1 at 20 steps equals the call with the chosen t0=18, t1=19 given."""
    pipe = TextToVideoZero.from_pretrained(tiny_model)
    kwargs = dict(num_frames=2, height=32, width=32, num_inference_steps=20, progress=False)
    own = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs)
    given = pipe("a cat", generator=torch.Generator().manual_seed(0), t0=18, t1=19, **kwargs)
    assert torch.equal(own, given)
    with pytest.raises(ValueError, match="t0=44 is out of range for 20 DDIM steps.*leave t0 and t1 unset"):
        pipe("a cat", t0=44, t1=47, **kwargs)  # explicit values out of range keep their error


@pytest.mark.parametrize("entry", ["t2vz", "run.py"])
def test_a_missing_model_is_named_before_the_values_that_depend_on_it(tmp_path, entry):
    """model=NO_SUCH_FOLDER with t1 out of range for 2 steps: the message is about the model, the real mistake."""
    script = ["-m", "t2vz"] if entry == "t2vz" else [str(REPO / "experiments" / "run.py"), "logger=disabled"]
    proc = subprocess.run([sys.executable, *script, "prompt=x", f"model={tmp_path / 'NO_SUCH_FOLDER'}",
                           "sampler.num_inference_steps=2", "method.t1=47", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "NO_SUCH_FOLDER does not exist" in proc.stderr and "method.t1" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_delta_t_sets_t0_from_t1_at_any_step_count():
    """method.delta_t (ablate_delta_t's swept key): t0 = t1 − Δt, t1 given or the model's own at that step count."""
    def method(*overrides):
        return to_generate_config(compose_generate(["prompt=p", "model=models/sd15", *overrides])).method
    assert (method("method.delta_t=3").t0, method("method.delta_t=3").t1) == (44, 47)
    at20 = method("method.delta_t=3", "sampler.num_inference_steps=20")
    assert (at20.t0, at20.t1) == (16, 19)
    assert method("method.delta_t=2", "method.t1=10").t0 == 8
    assert method("method.delta_t=3", "method.t0=44").t0 == 44  # agreeing values are fine (a saved config.yaml)
    with pytest.raises(ValueError, match="method.delta_t=30 exceeds method.t1=19"):
        method("method.delta_t=30", "sampler.num_inference_steps=20")
    with pytest.raises(ValueError, match="method.t0=40 and method.delta_t=3 disagree with method.t1=47"):
        method("method.delta_t=3", "method.t0=40")
    with pytest.raises(ValueError, match="method.delta_t=-1 must be an integer >= 0"):
        method("method.delta_t=-1")


def test_pipeline_delta_t(tiny_model):
    pipe = TextToVideoZero.from_pretrained(tiny_model)
    kwargs = dict(num_frames=2, height=32, width=32, num_inference_steps=10, progress=False)
    by_delta = pipe("a cat", generator=torch.Generator().manual_seed(0), t1=5, delta_t=2, **kwargs)
    assert torch.equal(by_delta, pipe("a cat", generator=torch.Generator().manual_seed(0), t0=3, t1=5, **kwargs))
    with pytest.raises(ValueError, match="t0=1 and delta_t=2 disagree with t1=5"):
        pipe("a cat", t0=1, t1=5, delta_t=2, **kwargs)
    with pytest.raises(ValueError, match="delta_t=9 exceeds t1=5"):
        pipe("a cat", t1=5, delta_t=9, **kwargs)


def test_image_to_video_on_the_toy_model(tmp_path):
    """`image=FILE`: frame 1 is the picture (DDIM-inverted, then denoised back), the error against it is printed and
    recorded in run.json with the picture's sha256; a picture of another size is resized, saying so in one line."""
    import hashlib

    from PIL import Image

    from t2vz.toyworld.judge import judge_image
    from t2vz.toyworld.world import render, sample_scene

    caption = "a red circle on grass"
    scene = sample_scene(np.random.default_rng(0), background="grass", things=[("red", "circle")])
    iio.imwrite(tmp_path / "scene.png", render(scene))
    Image.fromarray(render(scene)).resize((96, 80)).save(tmp_path / "wide.png")
    common = [f"prompt={caption}", "video.num_frames=3", "sampler.num_inference_steps=10", "output.progress=false"]
    same, wide = run_t2vz([*common, "image=scene.png", "hydra.run.dir=run"],  # relative: to the working directory
                          [*common, "image=wide.png", "hydra.run.dir=wide"], cwd=tmp_path)
    assert same.returncode == 0 and wide.returncode == 0, same.stderr[-2000:] + wide.stderr[-2000:]
    [line] = [line for line in same.stdout.splitlines() if "frame 1 vs image" in line]
    assert line.startswith("t2vz: frame 1 vs image: mean |error| ") and line.endswith(" dB"), line
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["image"] == {"file": "scene.png",
                             "sha256": hashlib.sha256((tmp_path / "scene.png").read_bytes()).hexdigest()}
    # measured: 7.3/255 and 25.1 dB (frame 1 of a text-to-video with this prompt: 33/255, 11.7 dB)
    assert info["first_frame_error"] < 12 and info["first_frame_psnr"] > 20, info
    assert f"{info['first_frame_error']:.1f}/255" in line
    first = iio.imread(tmp_path / "run" / "video.gif")[0][..., :3]  # lossless
    assert abs(np.abs(first.astype(float) - render(scene)).mean() - info["first_frame_error"]) < 0.5
    verdict = judge_image(first, caption)
    assert verdict["colour"] == "red" and verdict["colour_ok"], verdict
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").image == "scene.png"
    resized = [line for line in (wide.stdout + wide.stderr).splitlines() if "resized" in line]
    assert len(resized) == 1 and "image of 80×96 resized to 64×64" in resized[0], wide.stderr[-2000:]
    assert json.loads((tmp_path / "wide" / "run.json").read_text())["first_frame_error"] < 12

"""t2vz/app.py without a browser: widget values become the Hydra overrides the command line takes (any prompt
round-trips through Hydra and the shell), the app composes and checks the same config and writes the same frames as
`python -m t2vz` with the command line it displays, bad values are the command line's one-line error, seed -1 draws
a seed that is reported, the model picker sorts converted folders by kind, an uploaded image is kept in the run
folder that the command line names, "Show how it was made" writes the generation's trace sheet (and changes no
frame), the conditional tabs run their jobs, and the page queues generations one at a time.
tests/test_app_browser.py drives the page itself."""
from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_fixtures import tiny_ldm_checkpoint, write_checkpoint
from PIL import Image
from reference_models import tiny_instruct_pix2pix_folder
from test_conditional_runs import TINY_CONTROLNET

from t2vz import ControlNet
from t2vz.app import (
    CONTROL_JOB, INSTRUCT_JOB, SD_EXAMPLES, TEXT_TO_VIDEO_JOB, TOY_EXAMPLES, TOY_MODEL, TRACE, command_line,
    compose_config, defaults_of, examples_for, hydra_value, model_defaults_text, overrides, parse_args, run_job,
    scan_models, start_value,
)
from t2vz.sd.model_folder import write_controlnet_folder
from t2vz.toyworld.world import parse_caption
from t2vz.video_io import write_video
from weights_convert.__main__ import main as convert_main

REPO = Path(__file__).resolve().parents[1]
TOY_SMALL = {"prompt": "a red circle on grass", "model": TOY_MODEL, "seed": 5, "video.num_frames": 3,
             "sampler.num_inference_steps": 4, "method.direction": [1.0, 0.0], "output.fps": 4.0}


def cli(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2vz", *args, f"hydra.run.dir={run_dir}"], cwd=REPO, text=True,
                          capture_output=True, timeout=300)


@pytest.mark.parametrize("prompt", ["a red circle on grass", 'a "quoted" cat, on grass', "back\\slash\\", "null",
                                    "a ${oops} [1,2] = x: y'", "toyworld", "3"])
def test_any_prompt_round_trips_through_hydra_and_the_shell(prompt):
    args = overrides(TEXT_TO_VIDEO_JOB, {**TOY_SMALL, "prompt": prompt})
    assert shlex.split(command_line(TEXT_TO_VIDEO_JOB, args)) == ["t2vz", *args]
    cfg = compose_config(TEXT_TO_VIDEO_JOB, args)
    assert cfg.prompt == prompt and cfg.model == TOY_MODEL and cfg.seed == 5


def test_overrides_are_the_changed_values_and_defaults_come_from_the_config():
    defaults = defaults_of(TEXT_TO_VIDEO_JOB)
    assert defaults["sampler.num_inference_steps"] == 50 and defaults["method.direction"] == [1.0, 1.0]
    assert defaults["prompt"] is None and defaults["method.t0"] is None and defaults["dtype"] == "fp32"
    values = {**defaults, "prompt": "a blue square on sand", "model": TOY_MODEL, "seed": 7.0,
              "video.height": 48.0, "method.alpha": 0.6, "method.smooth_bg": True, "sampler.negative_prompt": " "}
    assert overrides(TEXT_TO_VIDEO_JOB, values) == [
        'prompt="a blue square on sand"', "model=toyworld", "seed=7", "video.height=48", "method.smooth_bg=true"]
    assert hydra_value([0.5, -1.0]) == "[0.5,-1.0]" and hydra_value(None) == "null"
    assert overrides(CONTROL_JOB, {"prompt": "p", "seed": 0})[-1] == "logger.enabled=false"  # the app logs nothing


@pytest.mark.parametrize("job", [TEXT_TO_VIDEO_JOB, CONTROL_JOB, INSTRUCT_JOB], ids=lambda job: job.config_name)
def test_lora_entries_become_the_command_lines_list(job):
    values = {"lora": " loras/a style.safetensors:0.8, loras/b.safetensors ,", "seed": 0}
    assert overrides(job, values)[1] == 'lora=["loras/a style.safetensors:0.8",loras/b.safetensors]'
    assert list(compose_config(job, overrides(job, values)).lora) == ["loras/a style.safetensors:0.8",
                                                                      "loras/b.safetensors"]
    assert overrides(job, {"lora": "  ", "seed": 0}) == ["seed=0", *job.fixed]  # empty: no LoRA, no override


def test_app_frames_equal_the_command_line_it_displays(tmp_path):
    result = run_job(TEXT_TO_VIDEO_JOB, TOY_SMALL, tmp_path / "app")
    assert result.error is None, result.error
    assert result.files == ["video.mp4", "video.gif", "video_sheet.png", "config.yaml", "run.json"]
    out = cli(shlex.split(result.command)[1:], tmp_path / "cli")
    assert out.returncode == 0, out.stderr
    for name in ("video_sheet.png", "video.gif"):  # lossless: every frame, pixel for pixel
        app_frames = np.asarray(Image.open(result.folder / name))
        cli_frames = np.asarray(Image.open(tmp_path / "cli" / name))
        np.testing.assert_array_equal(app_frames, cli_frames)
    assert (result.folder / "config.yaml").read_text() == (tmp_path / "cli" / "config.yaml").read_text()


def test_how_it_was_made_is_the_generations_trace_sheet_and_changes_no_frame(tmp_path):
    """"Show how it was made" (trace=true): the run folder gets the trace sheet trace.png (and trace/), the command
    line shown asks for it and writes the same sheet, and the video is the one made without it."""
    traced = run_job(TEXT_TO_VIDEO_JOB, {**TOY_SMALL, "trace": True}, tmp_path / "app")
    assert traced.error is None, traced.error
    assert traced.files[-2:] == ["trace.png", "trace/"] and traced.path("trace.png") == str(traced.folder / "trace.png")
    assert "trace=true" in shlex.split(traced.command)
    sheet = np.asarray(Image.open(traced.path("trace.png")))
    assert sheet.ndim == 3 and sheet.shape[1] > 3 * 160 and sheet.std() > 0  # a row of labelled 160-pixel tiles
    manifest = json.loads((traced.folder / "trace" / "manifest.json").read_text())
    assert manifest["info"]["prompt"] == TOY_SMALL["prompt"] and manifest["info"]["num_frames"] == 3
    assert all((traced.folder / tile["file"]).is_file() for tile in manifest["tiles"])
    plain = run_job(TEXT_TO_VIDEO_JOB, {**TOY_SMALL, "trace": False}, tmp_path / "app")
    assert plain.path("trace.png") is None and not any(a.startswith("trace") for a in shlex.split(plain.command))
    for name in ("video_sheet.png", "video.gif"):  # tracing changes no frame
        np.testing.assert_array_equal(np.asarray(Image.open(traced.folder / name)),
                                      np.asarray(Image.open(plain.folder / name)))
    out = cli(shlex.split(traced.command)[1:], tmp_path / "cli")
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cli" / "trace.png")), sheet)


def test_bad_values_are_the_command_lines_one_line_error_and_seed_minus_one_is_drawn(tmp_path):
    result = run_job(TEXT_TO_VIDEO_JOB, {**TOY_SMALL, "seed": -1, "video.height": 36}, tmp_path / "app")
    assert result.seed != -1 and f"seed={result.seed}" in shlex.split(result.command)
    out = cli(shlex.split(result.command)[1:], tmp_path / "cli")
    assert out.returncode == 2
    assert result.error == out.stderr.strip().splitlines()[-1]
    assert result.error.startswith("t2vz: error: video.height=36 must be a positive multiple of 8")
    assert result.folder is None and not any((tmp_path / "app").rglob("*.mp4"))  # no run folder left behind
    for values, expected in (({"method.t1": 9, "sampler.num_inference_steps": 4}, "method.t1=9 needs more than"),
                             ({"model": str(tmp_path / "nope")}, "does not exist"),
                             ({"dtype": "fp64"}, "dtype='fp64' is not one of"),
                             ({"video.num_frames": "x"}, "video.num_frames")):  # Hydra's type check, one line
        error = run_job(TEXT_TO_VIDEO_JOB, {**TOY_SMALL, **values}, tmp_path / "app").error
        assert error.startswith("t2vz: error: ") and expected in error and "\n" not in error, error


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder: a converted checkpoint, a ControlNet for it, an InstructPix2Pix model and a stray folder;
    and a control video (a white square moving right on black)."""
    root = tmp_path_factory.mktemp("models")
    ckpt = write_checkpoint(tiny_ldm_checkpoint(ema=True), root.parent / "dreambooth.ckpt")
    assert convert_main([str(ckpt), str(root / "sd")]) == 0
    torch.manual_seed(0)
    controlnet = ControlNet(TINY_CONTROLNET)
    write_controlnet_folder(root / "cn", controlnet.state_dict(), {"controlnet": dataclasses.asdict(TINY_CONTROLNET)})
    tiny_instruct_pix2pix_folder(root / "ip2p")
    (root / "notes").mkdir()
    frames = torch.zeros(3, 32, 32, 3)
    for k in range(3):
        frames[k, 8:20, 4 + 3 * k: 16 + 3 * k] = 1.0
    return root, write_video(root.parent / "square.mp4", frames)


def test_model_picker_lists_converted_folders_by_kind(models):
    root, _ = models
    assert scan_models(root) == {"model": [TOY_MODEL, str(root / "sd")], "controlnet": [str(root / "cn")],
                                 "instruct": [str(root / "ip2p")]}
    assert scan_models(root / "absent") == {"model": [TOY_MODEL], "controlnet": [], "instruct": []}
    # example prompts and the help line of the empty λ, t0, t1 follow the picked model
    assert examples_for(TEXT_TO_VIDEO_JOB, TOY_MODEL) == TOY_EXAMPLES
    assert examples_for(TEXT_TO_VIDEO_JOB, str(root / "sd")) == SD_EXAMPLES
    assert all(parse_caption(p)[0] and parse_caption(p)[1] for p in TOY_EXAMPLES)  # in the toy world's vocabulary
    assert "λ=32, t0=8, t1=8" in model_defaults_text(TOY_MODEL)  # the shipped folder's own
    assert "λ=12, t0=44, t1=47" in model_defaults_text(str(root / "sd"))  # the paper's
    # "Show how it was made" starts on for the toy model, off for others; the config's default stays off
    assert start_value(TRACE, False, TOY_MODEL) is True and start_value(TRACE, False, str(root / "sd")) is False
    assert defaults_of(TEXT_TO_VIDEO_JOB)["trace"] is False


def test_conditional_tabs_run_their_jobs(models, tmp_path):
    root, video = models
    common = {"seed": 1, "sampler.num_inference_steps": 2, "output.fps": 4.0}
    control = run_job(CONTROL_JOB, {**common, "prompt": "a cat", "model": str(root / "sd"),
                                    "controlnet": str(root / "cn"), "control.video": str(video),
                                    "control.detector": "canny"}, tmp_path)
    assert control.error is None, control.error
    args = shlex.split(control.command)
    assert args[:2] == ["python", "experiments/control_video.py"] and "control.detector=canny" in args
    copied = control.folder / "control.mp4"  # the upload is kept with the run: the command line names it
    assert f"control.video={copied.resolve()}" in args and copied.is_file()
    assert np.asarray(Image.open(control.folder / "video_sheet.png")).std() > 0
    instruct = run_job(INSTRUCT_JOB, {**common, "instruction": "make it winter", "model": str(root / "ip2p"),
                                      "source.video": str(video), "source.resolution": 32}, tmp_path)
    assert instruct.error is None, instruct.error
    assert "source.resolution=32" in shlex.split(instruct.command) and instruct.path(".mp4")
    missing = run_job(CONTROL_JOB, {**common, "prompt": "a cat", "model": TOY_MODEL}, tmp_path)
    assert missing.error.startswith("t2vz: error: missing controlnet, control.video")


def test_import_does_not_load_gradio():
    code = "import sys, t2vz.app; print('GRADIO', 'gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "GRADIO False" in out.stdout


def test_page_queues_generations_one_at_a_time_and_binds_localhost(models):
    pytest.importorskip("gradio")
    from t2vz.app import build_app

    args = parse_args([])
    assert (args.host, args.share, args.models) == ("127.0.0.1", False, "models")
    demo = build_app(str(models[0]), "outputs/app")
    generate = [fn for fn in demo.fns.values() if fn.name == "generate"]
    assert len(generate) == 3  # one per tab, one queue for all
    assert {(fn.concurrency_limit, fn.concurrency_id) for fn in generate} == {(1, "generate")}
    # text-to-video: "Show how it was made" starts on (the toy model), its section collapsed and hidden until a
    # generation fills it; Generate updates it
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert blocks["generate-trace"].value is True and blocks["generate-trace-section"].open is False
    assert blocks["generate-trace-section"].visible is False
    assert "control_experiment-trace-section" not in blocks and "instruct_experiment-trace" not in blocks
    updated = {tuple(getattr(b, "elem_id", None) for b in fn.outputs) for fn in generate}
    assert ("generate-status", "generate-output", "generate-sheet", "generate-seed-used", "generate-command",
            "generate-files", "generate-trace-section", "generate-trace-sheet") in updated


def test_image_to_video_tab_keeps_the_picture_and_its_command_line_reproduces_it(tmp_path):
    """An uploaded picture (gradio's numpy array) is saved as image.png in the run folder, which the command line
    names; frame 1 is close to it, and `python -m t2vz` with that command line gives the same frames. Without an
    image the command line has no image= (test_overrides_are_the_changed_values_...); a text file is one line."""
    from t2vz.toyworld.world import render, sample_scene

    picture = render(sample_scene(np.random.default_rng(0), background="grass", things=[("red", "circle")]))
    result = run_job(TEXT_TO_VIDEO_JOB, {**TOY_SMALL, "image": picture, "method.inversion_guidance_scale": 1.0},
                     tmp_path / "app")
    assert result.error is None, result.error
    kept = result.folder / "image.png"
    assert f"image={kept.resolve()}" in shlex.split(result.command)
    assert "method.inversion_guidance_scale" not in result.command  # the default: not an override
    np.testing.assert_array_equal(np.asarray(Image.open(kept)), picture)  # lossless
    info = json.loads((result.folder / "run.json").read_text())
    assert info["first_frame_error"] < 12, info  # measured 9.8/255 at 4 DDIM steps
    out = cli(shlex.split(result.command)[1:], tmp_path / "cli")
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(result.folder / "video_sheet.png")),
                                  np.asarray(Image.open(tmp_path / "cli" / "video_sheet.png")))
    (tmp_path / "notes.png").write_text("not a picture")
    bad = run_job(TEXT_TO_VIDEO_JOB, {**TOY_SMALL, "image": str(tmp_path / "notes.png")}, tmp_path / "app")
    assert bad.error.startswith(f"t2vz: error: cannot read image {tmp_path / 'notes.png'}: not an image"), bad.error
    assert bad.folder is None and len(list((tmp_path / "app").rglob("run.json"))) == 1  # no run folder left behind

"""The trace of one generation (t2vz/method/trace.py, `TextToVideoZero.__call__(trace=...)`, `python -m t2vz
trace=true`), on the toy model that ships with t2vz: tracing changes no frame, costs nothing when off, its
cross-frame attention map of a point on the subject lies on the subject in frame 1, and the command line writes the
labelled sheet, the images and the tensors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2vz.method import trace as trace_module
from t2vz.method.text2video_zero import TextToVideoZero
from t2vz.method.trace import Trace, ascii_caption, trace_sheet, write_trace
from t2vz.sd.attention import Attention, SelfAttentionProbe
from t2vz.toyworld.judge import look_for, subject_region

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on grass"
QUICK = dict(num_inference_steps=20, num_frames=4, progress=False)  # the toy model: T₁ = T₀ = 151 at 20 steps


@pytest.fixture(scope="module")
def pipe() -> TextToVideoZero:
    return TextToVideoZero.from_pretrained("toyworld")


def generate(pipe, seed: int = 1, **kwargs) -> torch.Tensor:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **{"progress": False, **kwargs})


@pytest.fixture(scope="module")
def traced(pipe):
    """Seed 1 at the toy model's defaults (50 DDIM steps, 8 frames; the judge sees the red circle in all 8), the
    point on the judge's subject as `python -m t2vz ... trace=true` places it: (frames, the Trace filled in)."""
    trace = Trace(subject=subject_region)
    frames = generate(pipe, trace=trace)
    assert pipe.last_trace is trace
    return frames, trace


def test_without_a_subject_function_the_point_is_the_image_centre(pipe, one_thread):
    """The method layer knows nothing of the toy world: `trace=True` places the point at the image centre and
    measures no mass on a subject."""
    generate(pipe, num_inference_steps=4, num_frames=2, trace=True)
    trace = pipe.last_trace
    assert trace.info["point"] == {"x": 32.0, "y": 32.0, "source": "the image centre"}
    assert not any("mass_first" in layer for layer in trace.info["attention"])


# ------------------------------------------------------------------------------------ tracing changes nothing
@pytest.mark.parametrize("options", [
    {},
    {"smooth_bg": True},                                          # the paper's per-step blend, attention masks
    {"smooth_bg": True, "smoothing": "authors"},                  # one blend at T₁
    {"chunk_size": 3},                                            # frame 4 in a later chunk than frame 1
    {"chunk_size": 3, "smooth_bg": True},
], ids=["plain", "smoothing", "authors-smoothing", "chunks", "chunks-smoothing"])
def test_tracing_changes_no_frame(pipe, one_thread, options):
    plain = generate(pipe, **QUICK, **options)
    trace = Trace(frame=4)
    assert torch.equal(generate(pipe, **QUICK, **options, trace=trace), plain)
    assert pipe.last_trace is trace and trace.tiles
    stages = trace.stages()
    assert (trace_module.SMOOTHING in stages) == bool(options.get("smooth_bg"))
    size = tuple(plain.shape[1:3])
    assert all(tuple(t.image.shape[:2]) == size for t in trace.tiles if t.stage == trace_module.SMOOTHING), \
        "every smoothing image (masks, blend) at the frame's size"
    if "chunk_size" in options:
        assert trace.info["chunks"] == [[1, 2, 3], [4]]
        assert trace.tile("frame_4").caption == "frame 4, chunk 2/2"
    assert all(layer["recorded"] for layer in trace.info["attention"])


def test_the_probe_reads_the_same_attention_in_chunks(pipe, one_thread):
    """Frame 4 in the second chunk attends to frame 1's keys taken in the first chunk: the same maps as unchunked
    (up to the batch's float rounding)."""
    whole, chunked = Trace(frame=4), Trace(frame=4)
    generate(pipe, **QUICK, trace=whole)
    generate(pipe, **QUICK, chunk_size=3, trace=chunked)
    for level in (1, 2):
        for tag in ("first", "own"):
            key = f"attn_L{level}_{tag}"
            torch.testing.assert_close(chunked.tile(key).tensor, whole.tile(key).tensor, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- nothing when it is off
def test_off_costs_nothing(pipe, monkeypatch):
    """Without `trace`: no probe is made or set (every attn1's `recorder` stays None through the generation), the
    UNet runs exactly Algorithm 1's calls (n + t1 − t0 = 20 at 20 steps, t0 = t1), the VAE decodes the frames only,
    and no trace is kept."""
    def refuse(*args, **kwargs):
        raise AssertionError("a SelfAttentionProbe was made or consulted with trace off")
    monkeypatch.setattr(SelfAttentionProbe, "__init__", refuse)
    monkeypatch.setattr(SelfAttentionProbe, "record_self", refuse)
    attn1 = [m.attn1 for m in pipe.sd.unet.modules() if hasattr(m, "attn1")]
    seen_recorders = []
    hooks = [a.register_forward_pre_hook(lambda module, args: seen_recorders.append(module.recorder)) for a in attn1]
    unet_calls, decodes = [], []
    hooks.append(pipe.sd.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(1)))
    hooks.append(pipe.sd.vae.decoder.register_forward_pre_hook(lambda module, args: decodes.append(1)))
    pipe.last_trace = "stale"
    try:
        generate(pipe, **QUICK)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen_recorders and all(r is None for r in seen_recorders)
    assert len(unet_calls) == QUICK["num_inference_steps"] and len(decodes) == QUICK["num_frames"]
    assert pipe.last_trace is None


def test_the_probe_leaves_the_layers_even_when_the_pass_fails(pipe):
    def fail(i, t, x):
        if i == 19:
            raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        generate(pipe, **QUICK, trace=True, callback=fail)
    assert all(m.recorder is None for m in pipe.sd.unet.modules() if isinstance(m, Attention))


# ------------------------------------------------------------------------------------ the attention heat map
def test_the_attention_of_a_point_on_the_subject_lies_on_the_subject_in_frame_1(traced):
    """Frame 2's point at the centroid of the judge's object region: at the finest self-attention layer (8×8 tokens,
    up_blocks.1.attentions.1, t = 81, the middle of the 9-step video pass) 0.82 of the cross-frame map's mass lies
    on frame 1's object, which covers 0.13 of the frame (a uniform map's mass), and the map peaks on it. The coarse
    layer (4×4 tokens, up_blocks.0.attentions.1) puts 0.14 there, about chance: a 16×16-pixel token holds about the
    whole object, and the layer attends broadly; only the finest layer is asserted on."""
    frames, trace = traced
    fine, coarse = trace.info["attention"]
    assert (fine["grid"], coarse["grid"]) == ([8, 8], [4, 4]) and fine["level"] == 1 and coarse["level"] == 2
    assert trace.info["point"]["source"].startswith("the centroid of the judge's object region in frame 2")
    assert fine["mass_first"] > 0.5 and fine["mass_first"] > 4 * fine["chance_first"]
    region = look_for(frames[0], "red").region
    weights = trace.tile("attn_L1_first").tensor
    peak = int(weights.argmax())
    y, x = divmod(peak, 8)
    assert region[y * 8 : y * 8 + 8, x * 8 : x * 8 + 8].any()  # the peak token covers part of the object
    for layer in (fine, coarse):
        for tag in ("first", "own"):
            tile = trace.tile(f"attn_L{layer['level']}_{tag}")
            assert tile.tensor.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_a_given_point_and_frame(pipe):
    trace = Trace(frame=5, point=(10.0, 50.0), attention_step=0, x0_steps=2)
    generate(pipe, **QUICK | {"num_frames": 6}, trace=trace)
    assert trace.info["point"] == {"x": 10.0, "y": 50.0, "source": "given"}
    assert trace.info["attention"][0]["token"] == 6 * 8 + 1  # row 50·8/64, column 10·8/64 of the 8×8 grid
    assert trace.info["attention_t"] == trace.info["video_timesteps"][0]
    assert len([t for t in trace.tiles if t.key.startswith("x0hat_step")]) == 2 * 6


@pytest.mark.parametrize("trace, match", [
    (Trace(point=(64, 10)), r"trace point \(x=64, y=10\) lies outside frame 2's 64×64 image: give 0 <= x < 64"),
    (Trace(point=(3, -1)), r"trace point \(x=3, y=-1\)"),
    (Trace(frame=9), r"trace frame=9 is beyond the video's 8 frames"),
    (Trace(attention_step=9), r"trace attention_step=9 is beyond the video pass's 9 DDIM steps"),
    ("yes", r"trace='yes' must be True, False, None or a"),
])
def test_bad_trace_settings_are_named(pipe, trace, match):
    with pytest.raises(ValueError, match=match):
        generate(pipe, trace=trace)


@pytest.mark.parametrize("kwargs, match", [
    ({"point": (1, 2, 3)}, "trace point=.* must be two finite numbers"),
    ({"frame": 0}, "trace frame=0 must be an integer >= 1"),
    ({"x0_steps": 0}, "trace x0_steps=0 must be an integer >= 1"),
    ({"subject": "toyworld"}, "trace subject='toyworld' must be a function"),
])
def test_bad_trace_objects_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trace(**kwargs)


# -------------------------------------------------------------------------------------------- the sheet
def test_every_stage_is_labelled_with_its_symbol(traced):
    _, trace = traced
    captions = {t.key: t.caption for t in trace.tiles}
    assert captions["x_T_1"] == "x_T¹, T=981"
    assert captions["x0hat_T1_1"] == "x̂₀¹ at T₁=161" and captions["x0hat_T0_1"] == "x̂₀¹ at T₀=161"
    assert captions["warped_2"] == "x̃², δ²=(32, 32)" and captions["warped_8"] == "x̃⁸, δ⁸=(224, 224)"
    assert captions["x_T1_3"] == "x³ at T₁=161"
    assert [k for k in captions if k.startswith("x0hat_step") and k.endswith("_1")] == [
        "x0hat_step1_1", "x0hat_step5_1", "x0hat_step9_1"]
    assert captions["x0hat_step9_2"] == "x̂₀² at t=1"
    assert captions["attn_L1_first"].startswith("Q²·K¹ᵀ over frame 1 (cross-frame), 8×8, t=81")
    assert captions["attn_L1_own"].startswith("Q²·K²ᵀ, within frame 2 (off), 8×8, t=81")
    sheet = trace_sheet(trace)
    assert sheet.ndim == 3 and sheet.shape[-1] == 3 and sheet.shape[0] > 7 * 160


def test_the_sheet_falls_back_to_plain_captions(traced, monkeypatch):
    from PIL import ImageFont

    def missing(*args, **kwargs):
        raise OSError("cannot open resource")
    monkeypatch.setattr(ImageFont, "truetype", missing)
    trace_module.caption_font.cache_clear()
    try:
        assert trace_module.caption_font(11)[1] is True
        assert trace_sheet(traced[1]).shape[-1] == 3
    finally:
        trace_module.caption_font.cache_clear()
    assert ascii_caption("x̂₀¹ at T₁=161") == "x^_0^1 at T_1=161"
    assert ascii_caption("x̃², δ²=(32, 32)") == "x~^2, delta^2=(32, 32)"


def test_write_trace(traced, tmp_path):
    _, trace = traced
    assert write_trace(tmp_path, trace) == ["trace.png", "trace/"]
    with np.load(tmp_path / "trace" / "trace.npz") as npz:
        keys, captions = list(npz["keys"]), list(npz["captions"])
        assert keys == [t.key for t in trace.tiles] and captions == [t.caption for t in trace.tiles]
        assert npz["x_T_1"].shape == (4, 16, 16) and npz["frames"].shape == (8, 64, 64, 3)
        assert npz["attn_L1_first"].shape == (8, 8) and npz["attn_L1_queries"].shape == (64, 64)
    for key in keys:
        assert (tmp_path / "trace" / f"{key}.png").is_file()
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left behind


# -------------------------------------------------------------------------------------------- the command
def test_command_line_writes_the_trace(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "t2vz", f"prompt={PROMPT}", "trace=true", f"hydra.run.dir={run}",
                           "output.progress=false"], cwd=tmp_path, env=env, text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "trace.png, trace/" in proc.stdout
    assert Image.open(run / "trace.png").size[0] > 0
    manifest = json.loads((run / "trace" / "manifest.json").read_text())
    captions = [t["caption"] for t in manifest["tiles"]]
    for symbol in ("x_T¹", "x̂₀¹ at T₁=161", "x̂₀¹ at T₀=161", "x̃², δ²=(32, 32)", "x² at T₁=161",
                   "x̂₀² at t=81", "frame 8", "Q²·K¹ᵀ over frame 1"):
        assert any(c.startswith(symbol) for c in captions), symbol
    for tile in manifest["tiles"]:
        assert (run / tile["file"]).is_file()
    with np.load(run / "trace" / "trace.npz") as npz:
        assert list(npz["captions"]) == captions
    assert manifest["info"]["attention"][0]["mass_first"] > 0  # seed 0: measured, whatever the subject


def test_an_experiment_job_writes_the_trace_and_needs_it_to_be_complete(tmp_path):
    """`experiments/run.py trace=true`: the job writes the trace beside its video, and a rerun counts the point
    complete only with trace.png there (one deleted: the point runs again and writes it back)."""
    run = tmp_path / "job"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    command = [sys.executable, str(REPO / "experiments" / "run.py"), "model=toyworld", f"prompt={PROMPT}",
               "trace=true", "video.num_frames=3", "sampler.num_inference_steps=6", "metrics.clip=null",
               "output.progress=false", "output.formats=[mp4]", f"hydra.run.dir={run}"]

    def job() -> subprocess.CompletedProcess:
        proc = subprocess.run(command, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc

    job()
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok"
    manifest = json.loads((run / "trace" / "manifest.json").read_text())
    assert any(t["caption"].startswith("Q²·K¹ᵀ over frame 1") for t in manifest["tiles"])
    assert Image.open(run / "trace.png").size[0] > 0
    written = (run / "trace.png").stat().st_mtime_ns
    rerun = job()
    assert "skipped: complete already" in rerun.stdout + rerun.stderr
    assert (run / "trace.png").stat().st_mtime_ns == written
    (run / "trace.png").unlink()
    again = job()
    assert "trace.png missing" in again.stdout + again.stderr
    assert (run / "trace.png").is_file()

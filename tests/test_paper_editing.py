"""experiments/paper_editing.py (t2vz/experiment/editing_runs.py): the toy pairs and pairs files, the skip reasons, a
skipped job in a multirun summary, and sweeps through Hydra on the toy model at tiny settings (3 frames, 3 DDIM
steps, 2 tuning steps): every method ends to end with a toy-derived 8-channel InstructPix2Pix folder and a tiny
random CLIP, and a sweep of ok and skipped jobs that exits 0."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from t2vz.experiment.editing_runs import (
    NO_INSTRUCT_MODEL, PaperEditingConfig, load_pairs, pair_range, read_pairs, select_pair, skip_reason,
    source_frames, toy_pairs, tuned_cache_file,
)
from t2vz.experiment.tracking import MultirunSummary
from t2vz.sd.model_folder import ModelFolderError, read_model_config, read_state_dict, resolve_model_path
from t2vz.toyworld.world import parse_caption
from t2vz.video_io import to_uint8, write_video

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "paper_editing.py"
TINY = ["num_frames=3", "num_inference_steps=3", "tune.steps=2", "output.progress=false", "output.formats=[gif]"]
CLIP_METRICS = ("textual_faithfulness", "frame_consistency", "frame_consistency_consecutive")
MODEL_FREE = ("warp_error", "flow_warp_error", "generate_s")
JUDGE = ("edit_ok", "colour_ok", "shape_ok", "background_ok", "all_ok", "object_motion_error")


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The shipped toy model made an InstructPix2Pix-shaped folder (its UNet's conv_in widened to 8 channels, the
    source channels small random weights), a tiny random CLIPModel folder, and an SDXL model folder's
    t2vz_model.json alone (what the skip check reads; it has no weights)."""
    from transformers import CLIPConfig, CLIPModel

    from t2vz.experiment.metrics import clip_image_processor
    from t2vz.sd.model_folder import write_model_folder

    root = tmp_path_factory.mktemp("models")
    toy = resolve_model_path("toyworld")
    meta = read_model_config(toy)
    weights = {c: read_state_dict(toy, c) for c in ("unet", "vae", "text_encoder")}
    conv_in = weights["unet"]["conv_in.weight"]
    source = 0.05 * torch.randn(conv_in.shape, generator=torch.Generator().manual_seed(0))
    weights["unet"]["conv_in.weight"] = torch.cat([conv_in, source], dim=1)
    config = {k: v for k, v in meta.items() if k not in ("format", "format_version")}
    config["unet"] = {**config["unet"], "in_channels": 8}
    config["variant"] = "toyworld-instruct-test"
    ip2p = write_model_folder(root / "ip2p", weights, config, toy / "tokenizer")

    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16))
    clip.save_pretrained(root / "clip")
    clip_image_processor(None, 32).save_pretrained(root / "clip")

    sdxl = root / "sdxl"
    sdxl.mkdir()
    (sdxl / "t2vz_model.json").write_text(json.dumps({
        "format": "t2vz-model", "format_version": 1, "family": "sdxl", "sample_size": 1024,
        "unet": {"in_channels": 4, "out_channels": 4}, "vae": {"latent_channels": 4}, "text_encoder": {},
        "text_encoder_2": {}}))
    return {"ip2p": ip2p, "clip": root / "clip", "sdxl": sdxl}


def config(**kwargs) -> PaperEditingConfig:
    return PaperEditingConfig(**{"cache_dir": "unused", **kwargs})


def run_script(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def job(sweep: Path, number: int) -> dict:
    return json.loads((sweep / str(number) / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------- the pairs
def test_toy_pairs_are_two_edits_of_four_sources():
    pairs = toy_pairs()
    assert len(pairs) == 8 and len({p.video for p in pairs}) == 4
    assert {p.edit for p in pairs} == {"colour", "shape", "background"}
    assert pairs[0].instruction == "make the circle blue" and pairs[0].edited_prompt == "a blue circle on grass"
    assert pairs[1].instruction == "put it on snow" and pairs[1].edited_prompt == "a red circle on snow"
    for p in pairs:  # the edited caption differs from the source caption in the edited attribute alone
        [(c0, s0)], b0 = parse_caption(p.prompt)
        [(c1, s1)], b1 = parse_caption(p.edited_prompt)
        changed = {k for k, a, b in (("colour", c0, c1), ("shape", s0, s1), ("background", b0, b1)) if a != b}
        assert changed == {p.edit}, p
    assert pair_range(None) == "range(0,8)" and load_pairs(None) == pairs


def test_toy_source_video_moves_the_object_at_its_velocity():
    from t2vz.toyworld.judge import object_motion_error

    frames = source_frames(toy_pairs()[2], config(num_frames=4, velocity=3.0))
    assert frames.shape == (4, 64, 64, 3) and 0.0 <= frames.min() and frames.max() <= 1.0
    assert object_motion_error(to_uint8(frames), "blue", (3.0, 0.0)) < 0.5


@pytest.fixture
def video(tmp_path) -> Path:
    frames = torch.rand(4, 48, 80, 3, generator=torch.Generator().manual_seed(0))
    (tmp_path / "videos").mkdir()
    return write_video(tmp_path / "videos" / "clip.gif", frames)


def test_pairs_file_yaml_and_json_lines_read_the_same(tmp_path, video):
    pair = {"video": "videos/clip.gif", "prompt": "a car", "instruction": "make it red", "edited_prompt": "a red car"}
    (tmp_path / "pairs.yaml").write_text(
        "# two pairs\n" + "".join(f"- video: {pair['video']}\n  prompt: {pair['prompt']}\n  instruction: "
                                  f"{pair['instruction']}\n  edited_prompt: {pair['edited_prompt']}\n" for _ in range(2)))
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n\n" + json.dumps(pair) + "\n")
    from_yaml, from_jsonl = read_pairs(tmp_path / "pairs.yaml"), read_pairs(tmp_path / "pairs.jsonl")
    assert from_yaml == from_jsonl and len(from_yaml) == 2
    assert Path(from_yaml[0].video) == video and from_yaml[0].edit is None and from_yaml[0].toy_source is None
    assert pair_range(str(tmp_path / "pairs.yaml")) == "range(0,2)"
    with pytest.raises(ValueError, match=r"pair=2 is out of range: pairs=.* has 2 pairs, pair=0..1"):
        select_pair(str(tmp_path / "pairs.yaml"), 2)
    # the frames every method edits: the first num_frames, the long side at `resolution`, sides multiples of 64
    frames = source_frames(from_yaml[0], config(num_frames=3, resolution=128))
    assert frames.shape == (3, 64, 128, 3)
    with pytest.raises(ValueError, match="num_frames=9 but the pair's video .* has only 4 frames"):
        source_frames(from_yaml[0], config(num_frames=9, resolution=128))


BAD_PAIRS = [
    ("pairs.yaml", "- video: videos/clip.gif\n  prompt: a car\n  edited_prompt: a red car\n", "has no instruction"),
    ("pairs.yaml", "- {video: videos/clip.gif, prompt: a, instruction: b, edited_prompt: c, strength: 2}\n",
     "unknown key.* strength"),
    ("pairs.yaml", "- {video: videos/clip.gif, prompt: '', instruction: b, edited_prompt: c}\n",
     "prompt='' must be a non-empty string"),
    ("pairs.yaml", "video: videos/clip.gif\n", "must hold a YAML list of pairs"),
    ("pairs.yaml", "- [unclosed\n", "is not valid YAML"),
    ("pairs.yaml", "[]\n", "holds no pair"),
    ("pairs.yaml", "- {video: videos/none.mp4, prompt: a, instruction: b, edited_prompt: c}\n",
     "video videos/none.mp4 not found"),
    ("pairs.jsonl", '{"video": "videos/clip.gif"}\nnot json\n', "line 2 is not a JSON object"),
    ("pairs.jsonl", '["videos/clip.gif", "a", "b", "c"]\n', "pair 0 is a list, not a mapping"),
    ("pairs.txt", "videos/clip.gif\ta\tb\tc\n", "suffix '.txt'"),
]


@pytest.mark.parametrize("name,text,message", BAD_PAIRS, ids=[m for _, _, m in BAD_PAIRS])
def test_bad_pairs_file_is_one_clear_error(tmp_path, video, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_pairs(tmp_path / name)
    assert str(error.value).startswith(f"pairs={tmp_path / name}") and "\n" not in str(error.value)


def test_missing_pairs_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"pairs=.*nothing.yaml: no such file; give a pairs file"):
        read_pairs(tmp_path / "nothing.yaml")


# ------------------------------------------------------------------------------------------ config and skipping
@pytest.mark.parametrize("kwargs,message", [
    ({"method": "magic"}, "method='magic' is not one of video_instruct_pix2pix, framewise_instruct_pix2pix"),
    ({"num_frames": 1}, "num_frames=1 must be an integer >= 2"),
    ({"resolution": 100}, "resolution=100 must be a multiple of 64"),
    ({"pair": -1}, "pair=-1 must be an integer >= 0"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


def test_a_clip_headline_needs_a_clip_model():
    from t2vz.experiment.config import MetricsConfig

    with pytest.raises(ValueError, match="metrics.headline=textual_faithfulness needs a CLIP model"):
        config(metrics=MetricsConfig(clip=None, headline="textual_faithfulness"))
    config(metrics=MetricsConfig(clip=None, headline="flow_warp_error"))


def test_skip_reasons_read_from_the_model_folders(models, tmp_path):
    ip2p, sdxl = str(models["ip2p"]), str(models["sdxl"])
    for method in ("video_instruct_pix2pix", "framewise_instruct_pix2pix"):
        assert skip_reason(config(method=method)) == NO_INSTRUCT_MODEL
        assert skip_reason(config(method=method, instruct_model=ip2p)) is None
        assert "has a 4-channel UNet, not an InstructPix2Pix UNet (4 + 4 = 8 channels" in \
            skip_reason(config(method=method, instruct_model="toyworld"))
        assert "is an SDXL model; Video Instruct-Pix2Pix runs on SD 1.5" in \
            skip_reason(config(method=method, instruct_model=sdxl))
    assert skip_reason(config(method="tune_a_video")) is None
    assert "is an SDXL model; Tune-A-Video" in skip_reason(config(method="tune_a_video", model=sdxl))
    assert "has a 8-channel UNet (an InstructPix2Pix model?)" in skip_reason(config(method="tune_a_video", model=ip2p))
    with pytest.raises(ModelFolderError):  # a wrong path is a mistake to fix, not a skip
        skip_reason(config(method="video_instruct_pix2pix", instruct_model=str(tmp_path / "nothing")))


def test_a_missing_toy_clip_says_what_to_give(tmp_path, monkeypatch):
    import t2vz.experiment.metrics as metrics
    from t2vz.experiment.editing_runs import load_scorer

    monkeypatch.setattr(metrics, "toy_clip_dir", lambda: tmp_path / "no_clip")
    with pytest.raises(ValueError, match="metrics.clip=toyworld: the toy CLIP is not in this installation .* "
                                         "set metrics.clip=FOLDER"):
        load_scorer(config())
    from t2vz.experiment.config import MetricsConfig

    assert load_scorer(config(metrics=MetricsConfig(clip=None, headline="warp_error"))) is None


def test_tuned_cache_is_one_file_per_source_and_seed(tmp_path):
    pairs = toy_pairs()
    c = config(cache_dir=str(tmp_path))
    first, second = (tuned_cache_file(p, c, (64, 64)) for p in pairs[:2])  # two edits of source 0
    assert first == second and first.parent == tmp_path
    assert tuned_cache_file(pairs[2], c, (64, 64)) != first  # another source
    assert tuned_cache_file(pairs[0], config(cache_dir=str(tmp_path), seed=1), (64, 64)) != first
    assert tuned_cache_file(pairs[0], config(cache_dir=str(tmp_path), tune=type(c.tune)(steps=3)), (64, 64)) != first


def write_jobs(sweep: Path, statuses: list[str]) -> None:
    for i, status in enumerate(statuses):
        (sweep / str(i)).mkdir(parents=True)
        record = {"overrides": [f"pair={i}"], "status": status, **({} if status == "ok" else {"error": "why"})}
        (sweep / str(i) / "metrics.json").write_text(json.dumps(record))


@pytest.mark.parametrize("statuses,exits", [
    (["skipped", "skipped"], False), (["ok", "skipped"], False), (["failed", "skipped"], True),
    (["failed", "ok", "skipped"], False)])
def test_multirun_summary_does_not_count_skipped_as_failed(tmp_path, capsys, statuses, exits):
    sweep = tmp_path / "sweep"
    write_jobs(sweep, statuses)
    cfg = OmegaConf.create({"logger": {"mode": "disabled"}, "hydra": {"sweep": {"dir": str(sweep)}}})
    if exits:
        with pytest.raises(SystemExit) as exit_info:
            MultirunSummary().on_multirun_end(cfg)
        assert exit_info.value.code == 2
        assert "no job of the sweep ran: 1 failed, 1 skipped" in capsys.readouterr().err
    else:
        MultirunSummary().on_multirun_end(cfg)
    with open(sweep / "summary.csv", newline="") as f:
        assert [row["status"] for row in csv.DictReader(f)] == statuses


def test_declared_sweep_covers_every_pair(tmp_path, video):
    from hydra import compose, initialize_config_dir

    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(
        {"video": str(video), "prompt": "a", "instruction": "b", "edited_prompt": f"c{i}"}) for i in range(3)))
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        toy = compose("paper_editing", overrides=["+experiment=paper_editing"], return_hydra_config=True)
        own = compose("paper_editing", overrides=["+experiment=paper_editing", f"pairs={tmp_path / 'pairs.jsonl'}"],
                      return_hydra_config=True)
    params = toy.hydra.sweeper.params
    assert params.method == "video_instruct_pix2pix,framewise_instruct_pix2pix,tune_a_video"
    assert params.pair == "range(0,8)" and str(params.seed) == "0"
    assert own.hydra.sweeper.params.pair == "range(0,3)"
    assert toy.metrics.headline == "textual_faithfulness" and toy.metrics.clip == "toyworld"


# ----------------------------------------------------------------------------------------- through Hydra, end to end
def test_every_method_end_to_end_on_the_toy_model(models, tmp_path):
    """One job per method on toy pair 0 with the toy-derived InstructPix2Pix folder and a tiny CLIP: every metric
    present and finite, the CLIP model recorded; the two Instruct-Pix2Pix jobs differ (cross-frame attention on /
    off), and the frame-by-frame job's frames are the pipeline's own with cross_frame="off"."""
    from t2vz.method.instruct import VideoInstructPix2Pix

    sweep = tmp_path / "sweep"
    proc = run_script(tmp_path, "-m", "+experiment=paper_editing", "pair=0", *TINY, f"instruct_model={models['ip2p']}",
                      f"metrics.clip={models['clip']}", f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [job(sweep, i) for i in range(3)]
    for record, method in zip(records, ("video_instruct_pix2pix", "framewise_instruct_pix2pix", "tune_a_video")):
        assert record["status"] == "ok" and f"method={method}" in record["overrides"], record
        assert record["clip_model"] == str(models["clip"])
        for key in (*CLIP_METRICS, *MODEL_FREE, *JUDGE):
            assert isinstance(record[key], float) and math.isfinite(record[key]), (method, key)
        assert 0.0 <= record["edit_ok"] <= 1.0 and "clip_score" not in record
        run = json.loads((sweep / str(records.index(record)) / "run.json").read_text())
        assert run["frames"] == [3, 64, 64, 3] and run["pair"]["instruction"] == "make the circle blue"
    assert records[2]["tune_s"] > 0 and "tune_s" not in records[0]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    video, framewise = (np.load(sweep / str(i) / "frames.npz")["frames"] for i in (0, 1))
    assert np.abs(video.astype(int) - framewise.astype(int)).max() > 10  # cross-frame attention changes the frames

    pair = toy_pairs()[0]
    source = source_frames(pair, config(num_frames=3))
    pipe = VideoInstructPix2Pix.from_pretrained(models["ip2p"])
    direct = pipe(pair.instruction, video=source, num_inference_steps=3, cross_frame="off", size_multiple=8,
                  generator=torch.Generator().manual_seed(0), progress=False)
    assert np.abs(to_uint8(direct).astype(int) - framewise.astype(int)).max() <= 1  # one level: thread counts


def test_sweep_of_ok_and_skipped_jobs_exits_0_and_shares_a_tuning(tmp_path):
    """No InstructPix2Pix model: the Instruct-Pix2Pix jobs are skipped with the reason, Tune-A-Video runs; the two
    edits of toy source 0 share one tuning; summary.csv holds both statuses; the sweep exits 0."""
    sweep = tmp_path / "sweep"
    proc = run_script(tmp_path, "-m", "+experiment=paper_editing", "method=framewise_instruct_pix2pix,tune_a_video",
                      "pair=0,1", *TINY, "metrics.clip=null", "metrics.headline=flow_warp_error",
                      f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped, _, tuned, cached = (job(sweep, i) for i in range(4))
    assert skipped == {"overrides": skipped["overrides"], "status": "skipped", "error": NO_INSTRUCT_MODEL}
    assert not (sweep / "0" / "frames.npz").exists()
    assert f"job 0 skipped: {NO_INSTRUCT_MODEL}" in proc.stderr
    assert tuned["status"] == cached["status"] == "ok" and "clip_model" not in tuned
    assert tuned["tune_s"] > 0 and cached["tune_s"] is None  # the second edit of source 0: tuning from the cache
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    with open(sweep / "summary.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["skipped", "skipped", "ok", "ok"]


@pytest.mark.parametrize("args,message", [
    (["pairs=PAIRS"], "paper_editing: error: pairs=PAIRS: pair 0 has no edited_prompt; each pair needs exactly"),
    (["-m", "+experiment=paper_editing", "pairs=PAIRS"], "paper_editing: error: pairs=PAIRS: pair 0 has no edited_prompt"),
    (["method=magic"], "paper_editing: error: method='magic' is not one of video_instruct_pix2pix"),
    (["pair=8"], "paper_editing: error: pair=8 is out of range: the toy world's pairs has 8 pairs, pair=0..7"),
])
def test_bad_input_on_the_command_line_is_one_line(tmp_path, args, message):
    pairs = tmp_path / "pairs.yaml"
    pairs.write_text("- {video: x.mp4, prompt: a, instruction: b}\n")
    args = [a.replace("PAIRS", str(pairs)) for a in args]
    where = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    proc = run_script(tmp_path, *args, f"{where}={tmp_path / 'out'}", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message.replace("PAIRS", str(pairs)) in proc.stderr


def test_help_lists_the_keys_and_methods(tmp_path):
    proc = run_script(tmp_path, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ("method=video_instruct_pix2pix", "framewise_instruct_pix2pix | tune_a_video", "pairs=null",
                 "instruct_model=null", "tune.steps=500", "metrics.clip=toyworld"):
        assert text in proc.stdout, text

"""What a user who mistypes gets, across every entry point: a corpus of bad inputs (broken and wrong files, folders
that are files, unwritable outputs, options out of range, NaN, missing and unreadable videos, control maps of the
wrong size or count, a video with no frames, LoRAs that are missing, pickled, of the other model family or of other
shapes).

Each command-line case asserts: a non-zero exit (2, a user error), one line on stderr that names the bad value
first, no traceback, and no partial video or model folder left behind. The commands run as the user runs them
(`python -m ...`, `experiments/*.py`), a few at a time, once per module; the Python API cases run in-process."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from ldm_fixtures import TINY_UNET, tiny_ldm_checkpoint, write_checkpoint
from reference_models import tiny_instruct_pix2pix_folder
from safetensors.torch import save_file
from sdxl_fixtures import OPEN_CLIP, tiny_sdxl_checkpoint

from t2vz.sd.controlnet import ControlNet, ControlNetConfig
from t2vz.sd.model_folder import write_controlnet_folder
from t2vz.video_io import write_image, write_video
from weights_convert.convert import convert

REPO = Path(__file__).resolve().parents[1]
TINY_CONTROLNET = ControlNetConfig.from_unet(TINY_UNET, conditioning_embedding_out_channels=(8, 16))  # fits "model"
D = TINY_UNET.cross_attention_dim  # the text width of "model"
CONVERT = [sys.executable, "-m", "weights_convert"]
T2VZ = [sys.executable, "-m", "t2vz"]
RUN = [sys.executable, str(REPO / "experiments" / "run.py"), "logger=disabled"]
CONTROL = [sys.executable, str(REPO / "experiments" / "control_video.py"), "logger=disabled"]
INSTRUCT = [sys.executable, str(REPO / "experiments" / "instruct_video.py"), "logger=disabled"]
SMALL = ["video.num_frames=2", "video.height=32", "video.width=32", "sampler.num_inference_steps=2",
         "output.progress=false"]


def rename_prefix(sd: dict, old: str, new: str) -> dict:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Every input of the corpus, good ones (a tiny model, its ControlNet, an InstructPix2Pix model, a control
    video) and bad ones, in one folder."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = tiny_ldm_checkpoint()
    write_checkpoint(good, root / "good.safetensors")
    convert(root / "good.safetensors", root / "model")
    torch.manual_seed(0)
    write_controlnet_folder(root / "cn", ControlNet(TINY_CONTROLNET).state_dict(),
                            {"controlnet": dataclasses.asdict(TINY_CONTROLNET)})
    tiny_instruct_pix2pix_folder(root / "ip2p")
    frames = torch.zeros(4, 32, 32, 3)
    for k in range(4):  # a square moving right (a GIF keeps identical frames as one)
        frames[k, 8:20, 4 + 3 * k : 16 + 3 * k] = 1.0
    write_video(root / "square.gif", frames)
    write_video(root / "odd_size.gif", frames[:, :31, :31])  # the tiny VAE downsamples by 2: 31 does not divide

    (root / "empty.safetensors").write_bytes(b"")
    data = (root / "good.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    # seeded bytes: os.urandom made 1 run in 256 a "safetensors" file, whose 9th byte is "{"
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (root / "random.ckpt").write_bytes(b"\x13\x37" + noise.numpy().tobytes())
    torch.save({"state_dict": {"a": torch.zeros(1)}, "x": Payload()}, root / "payload.ckpt")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, root / "lora.safetensors")
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{proj_in}.lora_down.weight": torch.zeros(4, 48), f"{proj_in}.lora_up.weight": torch.zeros(32, 4)},
              root / "lora_misshaped.safetensors")
    save_file({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)},
              root / "lora_unmatched.safetensors")
    q_proj = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"  # SDXL's second text encoder
    save_file({f"{q_proj}.lora_down.weight": torch.zeros(4, 64), f"{q_proj}.lora_up.weight": torch.zeros(64, 4)},
              root / "lora_sdxl.safetensors")
    torch.save({f"{proj_in}.lora_down.weight": torch.zeros(4, 32), "x": Payload()}, root / "lora_payload.pt")
    save_file({k: v for k, v in good.items() if k.startswith("first_stage_model.")}, root / "vae_only.safetensors")
    save_file(rename_prefix(good, "cond_stage_model.transformer.", "conditioner.embedders.0.transformer."),
              root / "sdxl.safetensors")
    save_file(rename_prefix(good, "cond_stage_model.transformer.text_model.", "cond_stage_model.model."),
              root / "sd2.safetensors")
    inpaint = dict(good)
    w = inpaint["model.diffusion_model.input_blocks.0.0.weight"]
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, *w.shape[2:])
    save_file(inpaint, root / "inpainting.safetensors")
    sdxl = tiny_sdxl_checkpoint()
    save_file(sdxl, root / "sdxl_base.safetensors")
    convert(root / "sdxl_base.safetensors", root / "sdxl_model")
    refiner = {k.replace("embedders.1.", "embedders.0."): v for k, v in sdxl.items()  # bigG alone, as embedder 0
               if not k.startswith("conditioner.embedders.") or k.startswith(OPEN_CLIP)}
    save_file(refiner, root / "sdxl_refiner.safetensors")
    w = sdxl["model.diffusion_model.input_blocks.0.0.weight"]
    save_file({**sdxl, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(w.shape[0], 9, *w.shape[2:])},
              root / "sdxl_inpainting.safetensors")
    save_file({k: v for k, v in good.items() if k != "model.diffusion_model.input_blocks.1.1.proj_in.weight"},
              root / "missing_key.safetensors")
    save_file({**good, "first_stage_model.quant_conv.bias": torch.zeros(5)}, root / "misshaped.safetensors")
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("hello")
    (root / "a_file.txt").write_text("not a folder")
    (root / "no_frames").mkdir()
    (root / "garbage.mp4").write_bytes(os.urandom(2048))
    (root / "notes.png").write_text("not a picture")  # image-to-video: a text file named like a picture
    write_image(root / "picture.png", frames[0])
    return root


class Payload:
    """A pickle whose loading would run a command, as a malicious checkpoint carries it."""

    def __reduce__(self):
        return (os.system, ("echo PAYLOAD-RAN",))


def t2vz(*overrides: str, model: str = "{root}/model") -> list[str]:
    """python -m t2vz on the tiny model, small and fast, with `overrides` (they come last, so they win)."""
    return T2VZ + ["prompt=x", f"model={model}", *SMALL, "hydra.run.dir={out}/r", *overrides]


def control(*overrides: str, video: str = "{root}/square.gif", controlnet: str = "{root}/cn") -> list[str]:
    return CONTROL + ["prompt=x", "model={root}/model", f"controlnet={controlnet}", f"control.video={video}",
                      "sampler.num_inference_steps=2", "hydra.run.dir={out}/r", *overrides]


def instruct(*overrides: str, video: str = "{root}/square.gif", model: str = "{root}/ip2p") -> list[str]:
    return INSTRUCT + ["instruction=make it snowy", f"model={model}", f"source.video={video}",
                       "sampler.num_inference_steps=2", "hydra.run.dir={out}/r", *overrides]


def convert_cli(src: str, out: str = "{out}/m") -> list[str]:
    return CONVERT + [src, out]


# name → (command, expected text on the error line). {root}: the fixture folder; {out}: where outputs would go.
CASES = {
    # weights_convert
    "convert-empty-file": (convert_cli("{root}/empty.safetensors"), "empty.safetensors is empty"),
    "convert-truncated": (convert_cli("{root}/truncated.safetensors"), "truncated"),
    "convert-random-bytes": (convert_cli("{root}/random.ckpt"), "neither a .safetensors file nor a PyTorch checkpoint"),
    "convert-pickle-payload": (convert_cli("{root}/payload.ckpt"),
                               "is a pickle holding Python objects that are not tensors"),
    "convert-lora": (convert_cli("{root}/lora.safetensors"), "lora.safetensors is a LoRA"),
    "convert-vae-only": (convert_cli("{root}/vae_only.safetensors"), "has no UNet weights"),
    "convert-sdxl": (convert_cli("{root}/sdxl.safetensors"), "Stable Diffusion XL"),
    "convert-sdxl-refiner": (convert_cli("{root}/sdxl_refiner.safetensors"), "is the Stable Diffusion XL refiner"),
    "convert-sdxl-inpainting": (convert_cli("{root}/sdxl_inpainting.safetensors"),
                                "is Stable Diffusion XL inpainting"),
    "convert-sd2": (convert_cli("{root}/sd2.safetensors"), "Stable Diffusion 2.x"),
    "convert-inpainting": (convert_cli("{root}/inpainting.safetensors"), "inpainting"),
    "convert-missing-key": (convert_cli("{root}/missing_key.safetensors"),
                            "1 missing keys: model.diffusion_model.input_blocks.1.1.proj_in.weight"),
    "convert-misshaped-key": (convert_cli("{root}/misshaped.safetensors"),
                              "first_stage_model.quant_conv.bias has shape (5,), expected (8,)"),
    "convert-missing-source": (convert_cli("{root}/nothing.safetensors"), "does not exist"),
    "convert-folder-not-a-model": (convert_cli("{root}/not_a_model"),
                                   "neither a checkpoint file nor a diffusers folder"),
    "convert-output-under-a-file": (convert_cli("{root}/good.safetensors", "{root}/a_file.txt/m"),
                                    "cannot write {root}/a_file.txt/m: {root}/a_file.txt is a file"),
    "convert-output-exists": (convert_cli("{root}/good.safetensors", "{root}/model"), "exists"),
    # python -m t2vz
    "t2vz-no-prompt": (T2VZ + ["hydra.run.dir={out}/r"], "no prompt given"),
    "t2vz-missing-model": (t2vz(model="{root}/nothing"), "nothing does not exist"),
    "t2vz-model-is-a-lora-file": (t2vz(model="{root}/lora.safetensors"), "lora.safetensors is a file"),
    "t2vz-model-folder-not-a-model": (t2vz(model="{root}/not_a_model"), "is not a t2vz model folder"),
    "t2vz-model-is-a-controlnet": (t2vz(model="{root}/cn"), "ControlNet"),
    "t2vz-zero-frames": (t2vz("video.num_frames=0"), "video.num_frames=0"),
    "t2vz-height-not-multiple-of-8": (t2vz("video.height=63"), "video.height=63"),
    "t2vz-zero-steps": (t2vz("sampler.num_inference_steps=0"), "sampler.num_inference_steps=0"),
    "t2vz-guidance-nan": (t2vz("sampler.guidance_scale=nan"), "sampler.guidance_scale=nan"),
    "t2vz-lambda-inf": (t2vz("method.motion_strength=inf"), "method.motion_strength=inf"),
    "t2vz-alpha-out-of-range": (t2vz("method.alpha=1.5"), "method.alpha=1.5"),
    "t2vz-t0-above-t1": (t2vz("method.t0=1", "method.t1=0"), "method.t1=0"),
    "t2vz-t1-beyond-steps": (t2vz("method.t1=5"), "method.t1=5"),
    "t2vz-unknown-cross-frame": (t2vz("method.cross_frame=last"), "method.cross_frame='last'"),
    "t2vz-chunk-size-1": (t2vz("video.chunk_size=1"), "video.chunk_size=1"),
    "t2vz-merging-ratio-1": (t2vz("fast.merging_ratio=1.0"), "fast.merging_ratio=1.0"),
    "t2vz-cache-interval-0": (t2vz("fast.cache_interval=0"), "fast.cache_interval=0"),
    "t2vz-cache-branch-too-deep": (t2vz("fast.cache_interval=2", "fast.cache_branch=99"), "cache_branch=99"),
    "t2vz-dtype": (t2vz("dtype=fp64"), "dtype='fp64'"),
    "t2vz-no-cuda": (t2vz("device=cuda"), "device='cuda'"),
    "t2vz-unwritable-output": (t2vz("hydra.run.dir={root}/a_file.txt/r"), "cannot create the output folder"),
    "t2vz-lora-missing": (t2vz("lora=[{root}/nothing.safetensors]"), "LoRA file {root}/nothing.safetensors does not"),
    "t2vz-lora-scale-not-a-number": (t2vz("lora=[{root}/lora.safetensors:strong]"),
                                     "lora entry '{root}/lora.safetensors:strong': the scale 'strong' is not a number"),
    "t2vz-lora-scale-inf": (t2vz("lora=[{root}/lora.safetensors:inf]"), "the scale inf must be a finite number"),
    "t2vz-lora-pickle-payload": (t2vz("lora=[{root}/lora_payload.pt]"), "is a pickle holding Python objects"),
    "t2vz-lora-for-sdxl": (t2vz("lora=[{root}/lora_sdxl.safetensors]"), "made for SDXL, the model is SD 1.5"),
    "t2vz-lora-unmatched": (t2vz("lora=[{root}/lora_unmatched.safetensors]"),
                            "does not match the model: 1 of its layers name no module of it, e.g. "
                            "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"),
    "t2vz-lora-misshaped": (t2vz("lora=[{root}/lora_misshaped.safetensors:0.5]"), "(4, 48)"),
    "t2vz-image-missing": (t2vz("image={root}/nothing.png"), "cannot read image {root}/nothing.png: no such file"),
    "t2vz-image-not-an-image": (t2vz("image={root}/notes.png"), "cannot read image {root}/notes.png: not an image"),
    "t2vz-image-without-motion-dynamics": (t2vz("image={root}/picture.png", "method.motion_dynamics=false"),
                                           "image={root}/picture.png cannot be used with method.motion_dynamics"),
    "t2vz-inversion-guidance-nan": (t2vz("image={root}/picture.png", "method.inversion_guidance_scale=nan"),
                                    "method.inversion_guidance_scale=nan"),
    # experiments/run.py
    "run-unknown-headline": (RUN + ["prompt=x", "model={root}/model", *SMALL, "metrics.headline=nope",
                                    "hydra.run.dir={out}/r"], "metrics.headline='nope'"),
    "run-missing-model": (RUN + ["prompt=x", "model={root}/nothing", *SMALL, "hydra.run.dir={out}/r"],
                          "nothing does not exist"),
    "run-lora-folder": (RUN + ["prompt=x", "model={root}/model", *SMALL, "lora=[{root}/model]",
                               "hydra.run.dir={out}/r"], "LoRA file {root}/model is a folder"),
    "run-image-not-an-image": (RUN + ["prompt=x", "model={root}/model", *SMALL, "image={root}/notes.png",
                                      "hydra.run.dir={out}/r"], "cannot read image {root}/notes.png: not an image"),
    # experiments/control_video.py
    "control-missing-video": (control(video="{root}/missing.mp4"), "missing.mp4"),
    "control-unreadable-video": (control(video="{root}/garbage.mp4"), "garbage.mp4"),
    "control-video-without-frames": (control(video="{root}/no_frames"), "no_frames"),
    "control-maps-wrong-size": (control(video="{root}/odd_size.gif"), "31×31"),
    "control-maps-too-few": (control("control.num_frames=9"), "control.num_frames=9"),
    "control-controlnet-is-a-model": (control(controlnet="{root}/model"), "model folder, not a ControlNet"),
    "control-lora-scale-nan": (control("lora=[{root}/lora.safetensors:nan]"), "the scale nan must be a finite"),
    "control-sdxl-model": (CONTROL + ["prompt=x", "model={root}/sdxl_model", "controlnet={root}/cn",
                                      "control.video={root}/square.gif", "hydra.run.dir={out}/r"],
                           "ControlVideo runs on SD 1.5 models and this one is sdxl"),
    "control-lora-for-sdxl": (control("lora=[{root}/lora_sdxl.safetensors:0.7]"), "made for SDXL"),
    # experiments/instruct_video.py
    "instruct-missing-video": (instruct(video="{root}/missing.mp4"), "missing.mp4"),
    "instruct-not-an-ip2p-model": (instruct(model="{root}/model"), "in_channels=4"),
    "instruct-image-guidance-nan": (instruct("sampler.image_guidance_scale=nan"), "sampler.image_guidance_scale=nan"),
    "instruct-sdxl-model": (instruct(model="{root}/sdxl_model"),
                            "VideoInstructPix2Pix runs on SD 1.5 models and this one is sdxl"),
    "instruct-lora-missing": (instruct("lora=[{root}/gone.safetensors:0.5]"), "gone.safetensors does not exist"),
}


@pytest.fixture(scope="module")
def results(files, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every command-line case run once, four at a time: name → (process, its output folder)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(REPO)}  # this checkout's t2vz, whatever the environment has installed

    def run(name: str):
        command, _ = CASES[name]
        out = tmp_path_factory.mktemp(name)
        args = [a.format(root=files, out=out) for a in command]
        return name, (subprocess.run(args, capture_output=True, text=True, env=env, cwd=out, timeout=600), out)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, CASES))


def test_the_corpus_is_large():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gets_one_clear_line(results, files, name):
    proc, out = results[name]
    expected = CASES[name][1].format(root=files, out=out)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line or "failed:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert expected in errors[0], f"{expected!r} not in {errors[0]!r}"
    assert "PAYLOAD-RAN" not in text
    left = [p for p in out.rglob("*") if p.suffix in (".mp4", ".gif", ".npz", ".safetensors")
            or p.name == "t2vz_model.json"]
    assert not left, f"partial outputs left behind: {left}"
    assert not (files / "a_file.txt").is_dir() and (files / "model" / "t2vz_model.json").is_file()


# ------------------------------------------------------------------------------------------- the Python API
@pytest.fixture(scope="module")
def pipe(files):
    import t2vz
    return t2vz.TextToVideoZero.from_pretrained(files / "model")


API_CASES = {
    "prompt-not-text": (dict(prompt=123), "prompt must be a string"),
    "latents-wrong-shape": (dict(latents=torch.zeros(1, 4, 3, 3)), "latents have shape (1, 4, 3, 3)"),
    "frames-zero": (dict(num_frames=0), "num_frames=0"),
    "lambda-nan": (dict(motion_strength=float("nan")), "motion_strength"),
    "direction-three-numbers": (dict(direction=(1.0, 0.0, 2.0)), "direction must be two finite numbers"),
    "unknown-option": (dict(num_frame=3), "unknown option(s) num_frame"),
    "masks-wrong-count": (dict(smooth_bg=True, masks=torch.ones(3, 32, 32)), "masks"),
    "merging-ratio-negative": (dict(merging_ratio=-0.5), "ratio=-0.5"),
    "merging-option-unknown": (dict(merging_ratio=0.5, merging_options={"stride": 2}), "unknown key(s) stride"),
    "cache-interval-float": (dict(cache_interval=2.5), "cache_interval=2.5"),
    "prompt-and-embeds": (dict(prompt_embeds=torch.zeros(1, 77, D)), "give prompt or prompt_embeds, not both"),
    "no-prompt-nor-embeds": (dict(prompt=None), f"no prompt: give prompt (text) or prompt_embeds (b, n_tokens, {D})"),
    "embeds-wrong-width": (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 768)),
                           f"prompt_embeds of shape (1, 77, 768), expected (b, n_tokens, {D})"),
    "negative-embeds-wrong-shape": (dict(prompt=None, prompt_embeds=torch.zeros(2, 77, D),
                                         negative_prompt_embeds=torch.zeros(1, 77, D)),
                                    f"negative_prompt_embeds of shape (1, 77, {D}), expected (2, 77, {D})"),
    "sdxl-prompt-2-on-sd15": (dict(prompt_2="a dog"), "prompt_2: SDXL option(s), and this model is SD 1.5"),
    "sdxl-size-on-sd15": (dict(target_size=(512, 512)), "target_size: SDXL option(s), and this model is SD 1.5"),
    "embeds-smoothing-without-masks": (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, D), smooth_bg=True),
                                       "smooth_bg with prompt_embeds needs masks="),
}


@pytest.mark.parametrize("name", sorted(API_CASES))
def test_bad_python_arguments_name_the_value(pipe, name):
    kwargs, expected = API_CASES[name]
    kwargs = {"prompt": "a cat", "num_frames": 2, "height": 32, "width": 32, "num_inference_steps": 2,
              "progress": False, **kwargs}
    with pytest.raises((ValueError, TypeError)) as info:
        pipe(kwargs.pop("prompt"), **kwargs)
    assert expected in str(info.value)


def test_control_video_api_refuses_a_count_mismatch(files):
    import t2vz
    pipe = t2vz.ControlVideo.from_pretrained(files / "model", controlnet=files / "cn")
    with pytest.raises(ValueError, match="num_frames=3 but the control video has 4 frames"):
        pipe("x", control=files / "square.gif", num_frames=3, num_inference_steps=2, progress=False)

"""weights_convert: single files and diffusers folders → t2vz model folders, checked tensor for tensor against
diffusers' own converter (`diffusers.loaders.single_file_utils`), and every refusal by its message."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ldm_fixtures import (
    TINY_CLIP, TINY_UNET, random_like, sd15_shapes, tiny_ldm_checkpoint, tiny_models, tiny_state_dicts, to_ldm,
    write_checkpoint, write_diffusers_folder,
)
from reference_models import TINY_VAE
from safetensors.torch import load_file

import t2vz
from t2vz.sd.model_folder import read_model_config, read_state_dict
from t2vz.sd.text_encoder import build_clip_text_model, clip_state_dict_for
from weights_convert import ConversionError, convert
from weights_convert.__main__ import main
from weights_convert.target import expected_shapes

COMPONENTS = ("unet", "vae", "text_encoder")


def read_ldm_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def diffusers_reference(path: Path, unet_config, vae_config, ema: bool) -> dict:
    """diffusers' converter on the same file. Its CLIP output keeps the file's key level and position_ids."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
    )

    ckpt = read_ldm_file(path)
    clip = convert_ldm_clip_checkpoint(ckpt)
    return {
        "unet": convert_ldm_unet_checkpoint(ckpt, unet_config, extract_ema=ema),
        "vae": convert_ldm_vae_checkpoint(ckpt, vae_config),
        "text_encoder": {(k if k.startswith("text_model.") else "text_model." + k): v
                         for k, v in clip.items() if not k.endswith("position_ids")},
    }


def assert_same(out: Path, reference: dict, dtype: torch.dtype, components=COMPONENTS) -> None:
    """Every component: same key set, every tensor exactly equal, in the requested dtype."""
    for c in components:
        ours = read_state_dict(out, c)
        assert ours.keys() == reference[c].keys(), (c, sorted(set(ours) ^ set(reference[c]))[:10])
        for k, ref in reference[c].items():
            assert ours[k].dtype == dtype, (c, k, ours[k].dtype)
            assert torch.equal(ours[k], ref.to(dtype)), (c, k)


@pytest.fixture(scope="module")
def tiny_diffusers():
    unet, vae, clip = tiny_models()
    return unet, vae, clip


@pytest.mark.parametrize(
    "suffix, file_dtype, ema, text_model_level",
    [(".safetensors", torch.float32, True, True), (".ckpt", torch.float16, True, False),
     (".safetensors", torch.float16, False, False), (".ckpt", torch.float32, False, True)],
)
def test_single_file_matches_diffusers_converter(tmp_path, tiny_diffusers, suffix, file_dtype, ema, text_model_level):
    """Our conversion = diffusers' converter on the same file, key for key, bit for bit (EMA taken when present)."""
    src = write_checkpoint(tiny_ldm_checkpoint(ema=ema, text_model_level=text_model_level, dtype=file_dtype),
                           tmp_path / f"model{suffix}")
    report = convert(src, tmp_path / "out")
    unet, vae, _ = tiny_diffusers
    assert_same(tmp_path / "out", diffusers_reference(src, unet.config, vae.config, ema), torch.float32)
    meta = read_model_config(tmp_path / "out")
    assert meta["source"] == {"path": str(src.resolve()), "layout": "single-file", "ema": ema,
                              "dtype": str(file_dtype).removeprefix("torch.")}
    assert meta["variant"] == "sd15" and meta["dtype"] == "float32" and report.ema == ema
    assert meta["unet"] == json.loads(json.dumps(dataclasses.asdict(TINY_UNET)))
    assert meta["vae"] == json.loads(json.dumps(dataclasses.asdict(TINY_VAE)))
    assert meta["text_encoder"] == TINY_CLIP


def test_ema_weights_are_preferred_and_no_ema_takes_the_live_ones(tmp_path, tiny_diffusers):
    src = write_checkpoint(tiny_ldm_checkpoint(ema=True), tmp_path / "model.safetensors")
    live, _, _ = tiny_state_dicts(0)
    ema, _, _ = tiny_state_dicts(10)
    assert not torch.equal(live["conv_in.weight"], ema["conv_in.weight"])
    convert(src, tmp_path / "ema")
    assert torch.equal(read_state_dict(tmp_path / "ema", "unet")["conv_in.weight"], ema["conv_in.weight"])
    assert main([str(src), str(tmp_path / "live"), "--no-ema", "--dtype", "fp16"]) == 0
    unet, vae, _ = tiny_diffusers
    assert_same(tmp_path / "live", diffusers_reference(src, unet.config, vae.config, ema=False), torch.float16)
    assert read_model_config(tmp_path / "live")["source"]["ema"] is False


def test_converted_folder_loads_strictly_into_diffusers_and_t2vz(tmp_path, tiny_diffusers):
    src = write_checkpoint(tiny_ldm_checkpoint(), tmp_path / "model.safetensors")
    convert(src, tmp_path / "out")
    unet, vae, _ = tiny_models(seed=5)  # fresh models, other weights: load_state_dict must replace all of them
    unet.load_state_dict(read_state_dict(tmp_path / "out", "unet"), strict=True)
    vae.load_state_dict(read_state_dict(tmp_path / "out", "vae"), strict=True)
    clip = build_clip_text_model(read_model_config(tmp_path / "out")["text_encoder"])
    clip.load_state_dict(clip_state_dict_for(clip, read_state_dict(tmp_path / "out", "text_encoder")), strict=True)
    ref_unet, _, _ = tiny_state_dicts(0)
    assert all(torch.equal(v, ref_unet[k]) for k, v in unet.state_dict().items())
    sd = t2vz.load(tmp_path / "out")
    assert torch.equal(sd.unet.conv_in.weight, ref_unet["conv_in.weight"])


@pytest.mark.parametrize("layout", ["single-file-fp16-ema", "diffusers-folder"])
@torch.no_grad()
def test_converted_model_generates_what_diffusers_builds_from_the_same_file(tmp_path, layout):
    """The whole chain: t2vz.load(our conversion of a file) against diffusers' models built from diffusers' own
    conversion of the same file: same UNet, VAE and text-encoder outputs, same image for the same seed
    (fp32, tolerance conftest.PARITY_RTOL)."""
    from conftest import assert_parity
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from reference_models import stable_diffusion_pipeline

    unet, vae, clip = tiny_models()
    if layout == "diffusers-folder":
        src = write_diffusers_folder(tmp_path / "sd", unet, vae, clip)
    else:
        src = write_checkpoint(tiny_ldm_checkpoint(ema=True, dtype=torch.float16), tmp_path / "model.safetensors")
        reference = diffusers_reference(src, unet.config, vae.config, ema=True)
        unet, vae = UNet2DConditionModel.from_config(unet.config), AutoencoderKL.from_config(vae.config)
        clip = build_clip_text_model(TINY_CLIP)
        unet.load_state_dict(reference["unet"], strict=True)
        vae.load_state_dict(reference["vae"], strict=True)
        clip.load_state_dict(clip_state_dict_for(clip, reference["text_encoder"]), strict=True)
    convert(src, tmp_path / "out")
    sd = t2vz.load(tmp_path / "out")
    unet, vae, clip = unet.float().eval(), vae.float().eval(), clip.float().eval()

    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    assert_parity(sd.unet(x, 321, context), unet(x, 321, context).sample)
    assert_parity(sd.vae.decode(x), vae.decode(x).sample)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert_parity(sd.vae.encode(images), vae.encode(images).latent_dist.mode())
    pipe = stable_diffusion_pipeline(unet, vae, clip)
    text, _ = pipe.encode_prompt(["a photo of a cat"], "cpu", 1, False)
    assert_parity(sd.text_encoder(["a photo of a cat"]), text)
    ours = t2vz.text_to_image(sd, "a cat", 32, 32, 10, generator=torch.Generator().manual_seed(3), progress=False)
    ref = pipe("a cat", height=32, width=32, num_inference_steps=10, generator=torch.Generator().manual_seed(3),
               output_type="pt").images[0]
    assert_parity(ours, ref.permute(1, 2, 0))


@pytest.mark.parametrize("kind", ["safetensors", "fp16-variant-old-vae-names", "bin"])
def test_diffusers_folder_converts_by_identity(tmp_path, kind):
    unet, vae, clip = tiny_models()
    options = {"safetensors": {},
               "fp16-variant-old-vae-names": dict(variant="fp16", old_vae_names=True, clip_text_model_level=True,
                                                  tokenizer_config=False),
               "bin": dict(safetensors=False)}[kind]
    if kind.startswith("fp16"):
        unet, vae = unet.half(), vae.half()
    src = write_diffusers_folder(tmp_path / "sd", unet, vae, clip, **options)
    report = convert(src, tmp_path / "out")
    reference = {"unet": unet.state_dict(), "vae": vae.state_dict(),
                 "text_encoder": {("text_model." + k).replace("text_model.text_model.", "text_model."): v
                                  for k, v in clip.state_dict().items()}}
    if kind.startswith("fp16"):
        assert any("old diffusers names" in n for n in report.notes)
    assert_same(tmp_path / "out", reference, torch.float32)
    meta = read_model_config(tmp_path / "out")
    assert meta["source"]["layout"] == "diffusers" and meta["source"]["ema"] is False
    assert meta["unet"] == json.loads(json.dumps(dataclasses.asdict(TINY_UNET)))
    assert meta["text_encoder"] == TINY_CLIP
    tok = json.loads((tmp_path / "out" / "tokenizer" / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == 77


def test_instruct_pix2pix_and_allowed_inpainting_variants(tmp_path):
    ip2p = dataclasses.replace(TINY_UNET, in_channels=8)
    convert(write_checkpoint(tiny_ldm_checkpoint(unet_cfg=ip2p), tmp_path / "ip2p.safetensors"), tmp_path / "a")
    assert read_model_config(tmp_path / "a")["variant"] == "instruct-pix2pix"
    assert read_model_config(tmp_path / "a")["unet"]["in_channels"] == 8
    inpaint = write_checkpoint(tiny_ldm_checkpoint(unet_cfg=dataclasses.replace(TINY_UNET, in_channels=9)),
                               tmp_path / "inpaint.safetensors")
    with pytest.raises(ConversionError, match=r"inpainting model \(UNet with 9 input channels.*--allow-inpainting"):
        convert(inpaint, tmp_path / "b")
    convert(inpaint, tmp_path / "b", allow_inpainting=True)
    assert read_model_config(tmp_path / "b")["variant"] == "inpainting"


def test_expected_shapes_are_diffusers_shapes():
    """The converter's strict check uses t2vz's classes; they must hold exactly diffusers' SD 1.5 keys and shapes."""
    full = sd15_shapes()
    assert expected_shapes("unet", t2vz.sd.unet.UNetConfig()) == full["unet"]
    assert expected_shapes("vae", t2vz.sd.vae.VAEConfig()) == full["vae"]
    from reference_models import SD15_CLIP
    assert expected_shapes("text_encoder", SD15_CLIP) == full["text_encoder"]
    unet, vae, _ = tiny_models()
    assert expected_shapes("unet", TINY_UNET) == {k: v.shape for k, v in unet.state_dict().items()}
    assert expected_shapes("vae", TINY_VAE) == {k: v.shape for k, v in vae.state_dict().items()}


# --- refusals -------------------------------------------------------------------------------------------------


def tiny_file(tmp_path: Path, edit=None, name: str = "model.safetensors") -> Path:
    sd = tiny_ldm_checkpoint()
    if edit:
        edit(sd)
    return write_checkpoint(sd, tmp_path / name)


def _rename_prefix(old: str, new: str):
    def edit(sd):
        for k in [k for k in sd if k.startswith(old)]:
            sd[new + k[len(old):]] = sd.pop(k)
    return edit


def _add(**tensors):
    return lambda sd: sd.update({k.replace("__", "."): v for k, v in tensors.items()})


REFUSALS = {
    "sd2-openclip": (_rename_prefix("cond_stage_model.transformer.text_model.", "cond_stage_model.model."),
                     r"Stable Diffusion 2\.x model \(OpenCLIP text encoder"),
    "sd2-context-1024": (lambda sd: sd.update({k: torch.zeros(v.shape[0], 1024) for k, v in sd.items()
                                              if "attn2.to_k" in k or "attn2.to_v" in k}),
                         r"Stable Diffusion 2\.x model \(1024-dim cross-attention context\)"),
    "sd2-linear-proj": (lambda sd: sd.update({k: v[:, :, 0, 0] for k, v in sd.items() if "proj_in.weight" in k}),
                        r"Stable Diffusion 2\.x model \(linear proj_in"),
    "sdxl-conditioner": (_rename_prefix("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."),
                         r"Stable Diffusion XL checkpoint"),
    "sdxl-label-emb": (_add(model__diffusion_model__label_emb__0__0__weight=torch.zeros(128, 2816)),
                       r"Stable Diffusion XL checkpoint"),
    "controlnet": (_add(control_model__time_embed__0__weight=torch.zeros(128, 32)),
                   r"has no control_model\.input_blocks\.0\.0\.weight, which gives the ControlNet's shape; is it a "
                   r"complete ControlNet checkpoint\?"),
    "missing": (lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith("first_stage_model.decoder.up.0")]],
                r"26 missing keys: first_stage_model\.decoder\.up\.0\.block\.0\.norm1\.weight, .* \.\.\. and 18 more"),
    "missing-proj-in": (lambda sd: sd.pop("model.diffusion_model.input_blocks.1.1.proj_in.weight"),
                        r"does not match an SD 1\.x model: 1 missing keys: "
                        r"model\.diffusion_model\.input_blocks\.1\.1\.proj_in\.weight\. "),
    "unexpected": (_add(model__diffusion_model__extra__weight=torch.zeros(3), lora_unet_down__alpha=torch.zeros(1)),
                   r"2 unexpected keys: lora_unet_down\.alpha, model\.diffusion_model\.extra\.weight"),
    "wrong-shape": (lambda sd: sd.update({"first_stage_model.quant_conv.bias": torch.zeros(5)}),
                    r"1 wrong shapes: first_stage_model\.quant_conv\.bias has shape \(5,\), expected \(8,\)"),
    "no-unet": (_rename_prefix("model.diffusion_model.", "lora."),
                r"has no UNet weights \(model\.diffusion_model\.\*\).*LoRA"),
    "no-text-encoder": (_rename_prefix("cond_stage_model.", "nothing."),
                        r"has no cond_stage_model\.transformer\.embeddings\.token_embedding\.weight, which gives the "
                        r"text encoder's shape"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_of_single_files(tmp_path, case):
    edit, message = REFUSALS[case]
    with pytest.raises(ConversionError, match=message):
        convert(tiny_file(tmp_path, edit), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vae_training_losses_are_left_out_with_a_note(tmp_path):
    src = tiny_file(tmp_path, _add(first_stage_model__loss__logvar=torch.zeros(()),
                                   first_stage_model__loss__discriminator__main__0__weight=torch.zeros(4, 3, 4, 4)))
    report = convert(src, tmp_path / "out")
    assert any("left out 2 first_stage_model.loss.* tensors" in note for note in report.notes)


def test_partial_ema_points_to_no_ema(tmp_path):
    def edit(sd):
        sd.pop(next(k for k in sd if k.startswith("model_ema.diffusion_model")))

    sd = tiny_ldm_checkpoint(ema=True)
    edit(sd)
    src = write_checkpoint(sd, tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match=r"1 missing keys: model_ema\.diffusion_model.*pass --no-ema"):
        convert(src, tmp_path / "out")
    convert(src, tmp_path / "out", prefer_ema=False)


def test_refusals_of_broken_files(tmp_path):
    good = tiny_file(tmp_path)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"cut\.safetensors is a truncated or corrupt \.safetensors file"):
        convert(tmp_path / "cut.safetensors", tmp_path / "out")
    ckpt = tiny_file(tmp_path, name="model.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    with pytest.raises(ConversionError, match=r"cut\.ckpt is truncated or corrupt .*download it again"):
        convert(tmp_path / "cut.ckpt", tmp_path / "out")
    (tmp_path / "notes.txt").write_text("hello, this is not a model")
    with pytest.raises(ConversionError, match=r"neither a \.safetensors file nor a PyTorch checkpoint"):
        convert(tmp_path / "notes.txt", tmp_path / "out")


class ModelCheckpoint:
    """Stands in for the Lightning callback objects that old .ckpt files pickle next to their state_dict."""


class Payload:
    """A pickle whose loading would run a command: os.system, as a malicious checkpoint carries it."""

    def __reduce__(self):
        return (os.system, ("echo PAYLOAD-RAN",))


def test_refuses_pickles_with_python_objects(tmp_path, capfd):
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callbacks": ModelCheckpoint()}, tmp_path / "objects.ckpt")
    with pytest.raises(ConversionError, match=r"is a pickle holding Python objects that are not tensors "
                                              r"\(.*ModelCheckpoint\); it is refused because loading it would "
                                              r"run code from the file. Use the model's .safetensors release"):
        convert(tmp_path / "objects.ckpt", tmp_path / "out")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "x": Payload()}, tmp_path / "payload.ckpt")
    with pytest.raises(ConversionError, match=r"payload\.ckpt is a pickle holding Python objects that are not "
                                              r"tensors \(\w+\.system\); it is refused because loading it"):
        convert(tmp_path / "payload.ckpt", tmp_path / "out")
    assert "PAYLOAD-RAN" not in capfd.readouterr().out and not (tmp_path / "out").exists()


def test_refusals_of_paths(tmp_path):
    with pytest.raises(ConversionError, match=r"missing\.safetensors does not exist"):
        convert(tmp_path / "missing.safetensors", tmp_path / "out")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConversionError, match=r"neither a checkpoint file nor a diffusers folder"):
        convert(tmp_path / "folder", tmp_path / "out")
    src = tiny_file(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match=r"output folder .*out already exists; pass --overwrite"):
        convert(src, tmp_path / "out")
    with pytest.raises(ConversionError, match=r"would replace the checkpoint"):
        convert(src, tmp_path, overwrite=True)
    convert(src, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "unet.safetensors").is_file()


@pytest.mark.parametrize("edit, message", [
    (lambda p: _edit_json(p / "unet" / "config.json", cross_attention_dim=1024), r"2\.x model \(1024-dim"),
    (lambda p: _edit_json(p / "unet" / "config.json", use_linear_projection=True), r"2\.x .*use_linear_projection"),
    (lambda p: _edit_json(p / "scheduler" / "scheduler_config.json", prediction_type="v_prediction"),
     r"2\.x model \(scheduler prediction_type v_prediction"),
    (lambda p: (p / "text_encoder_2").mkdir(), r"Stable Diffusion XL folder"),
    (lambda p: _edit_json(p / "unet" / "config.json", resnet_time_scale_shift="scale_shift"),
     r"unet/config\.json describes a model t2vz does not build: \{'resnet_time_scale_shift': 'scale_shift'\}"),
    (lambda p: _edit_json(p / "unet" / "config.json", in_channels=9), r"inpainting model"),
    (lambda p: (p / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
     r"vae has no weights: looked for diffusion_pytorch_model\.safetensors, "),
    (lambda p: _edit_json(p / "unet" / "config.json", layers_per_block=1),
     r"96 unexpected keys: unet/down_blocks\.0\.attentions\.1\..*; 4 wrong shapes: "
     r"unet/up_blocks\.0\.resnets\.1\.norm1\.weight has shape \(128,\), expected \(96,\)"),
])
def test_refusals_of_diffusers_folders(tmp_path, tiny_diffusers, edit, message):
    src = write_diffusers_folder(tmp_path / "sd", *tiny_diffusers)
    edit(src)
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "out")


def _edit_json(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# --- CLI and atomicity ----------------------------------------------------------------------------------------


def test_cli_success_prints_a_summary(tmp_path, capsys):
    src = write_checkpoint(tiny_ldm_checkpoint(ema=True, dtype=torch.float16), tmp_path / "model.ckpt")
    assert main([str(src), str(tmp_path / "out"), "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "single-file layout, float16 weights, variant sd15" in out and "EMA weights" in out
    assert f"wrote    {tmp_path / 'out'} (float16;" in out


def test_cli_refusal_is_one_line_exit_2(tmp_path, capsys):
    src = tiny_file(tmp_path, REFUSALS["controlnet"][0])
    assert main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is it a complete ControlNet checkpoint?" in err and "Traceback" not in err
    run = subprocess.run([sys.executable, "-m", "weights_convert", str(src), str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("weights_convert: error: ") and run.stderr.count("\n") == 1, run.stderr
    assert "Traceback" not in run.stderr


def test_cli_help_names_the_layouts(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "diffusers folder" in out and ".ckpt" in out and "--no-ema" in out and "examples:" in out


def test_out_is_never_half_written(tmp_path, monkeypatch, capsys):
    """A failure while writing (here: the disk fills up at the second file) leaves no OUT and no .partial folder,
    and an existing OUT replaced with --overwrite stays as it was."""
    import t2vz.sd.model_folder as model_folder

    src = tiny_file(tmp_path)
    real_save, calls = model_folder.save_file, []

    def failing_save(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(model_folder, "save_file", failing_save)
    assert main([str(src), str(tmp_path / "out")]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]

    monkeypatch.setattr(model_folder, "save_file", real_save)
    convert(src, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    monkeypatch.setattr(model_folder, "save_file", failing_save)
    calls.clear()
    with pytest.raises(OSError):
        convert(src, tmp_path / "out", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "out"]


# --- the full SD 1.5 shapes -----------------------------------------------------------------------------------


@pytest.mark.full
def test_full_sd15_fp16_single_file_with_ema_matches_diffusers_converter(tmp_path):
    """A random fp16 single file of SD 1.5's shapes with EMA weights (~3.9 GB) converts as diffusers converts it."""
    start = time.perf_counter()
    shapes = sd15_shapes()
    unet_config, vae_config = shapes.pop("configs")
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(40_000_000, generator=gen).half()  # 80 MB of random values; tensors are slices at random offsets
    sds = {c: random_like(s, pool, gen) for c, s in shapes.items()}
    ema = random_like(shapes["unet"], pool, gen)
    src = write_checkpoint(to_ldm(sds["unet"], sds["vae"], sds["text_encoder"], t2vz.sd.unet.UNetConfig(),
                                  t2vz.sd.vae.VAEConfig(), ema_unet=ema), tmp_path / "sd15.safetensors")
    del sds, ema, pool
    made = time.perf_counter()
    report = convert(src, tmp_path / "out", dtype="fp16")
    converted = time.perf_counter()
    assert report.ema and report.source_dtype == "float16" and report.variant == "sd15"
    sd15_unet = json.loads(json.dumps(dataclasses.asdict(t2vz.sd.unet.UNetConfig())))
    assert read_model_config(tmp_path / "out")["unet"] == sd15_unet
    assert_same(tmp_path / "out", diffusers_reference(src, unet_config, vae_config, ema=True), torch.float16)
    print(f"\nfull SD 1.5: make file {made - start:.1f}s, convert {converted - made:.1f}s, "
          f"check {time.perf_counter() - converted:.1f}s; parameters {report.parameters}")


def test_text_encoder_width_must_feed_the_unet():
    from weights_convert.target import config_dicts

    with pytest.raises(ConversionError, match="text encoder's width 32 does not match the UNet's cross-attention "
                                              "dim 64: the components come from different models"):
        config_dicts(TINY_UNET, TINY_VAE, dict(TINY_CLIP, hidden_size=32))

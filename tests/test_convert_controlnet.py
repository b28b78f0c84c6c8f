"""weights_convert on SD 1.x ControlNets: original single files (control_model.*, alone or beside a whole SD model)
and diffusers ControlNetModel folders → t2vz ControlNet folders, checked tensor for tensor against diffusers' own
`convert_controlnet_checkpoint`, loaded with `t2vz.load_controlnet` and run against diffusers' ControlNetModel."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_parity
from ldm_fixtures import tiny_ldm_checkpoint, write_checkpoint
from reference_models import TINY_CONTROLNET, diffusers_controlnet, tiny_reference_folder
from safetensors.torch import load_file

import t2vz
from t2vz.sd.model_folder import ModelFolderError, read_controlnet_config, read_state_dict
from weights_convert import ConversionError, convert
from weights_convert.__main__ import main
from weights_convert.controlnet import cldm_name


@pytest.fixture(scope="module")
def reference():
    return diffusers_controlnet(TINY_CONTROLNET, seed=5)


def cldm_state_dict(ref, prefix: str = "control_model.") -> dict:
    """The original (lllyasviel cldm) single-file layout of a diffusers ControlNetModel's weights."""
    return {prefix + cldm_name(k, TINY_CONTROLNET): v.clone() for k, v in ref.state_dict().items()}


def read_file(path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def diffusers_conversion(path) -> dict:
    """diffusers' converter on the same file (it takes the control_model.* part of a full file itself)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    return convert_controlnet_checkpoint(read_file(path), {"layers_per_block": TINY_CONTROLNET.layers_per_block})


def assert_same_tensors(ours: dict, expected: dict, dtype=torch.float32):
    assert ours.keys() == expected.keys(), sorted(set(ours) ^ set(expected))[:10]
    for k, v in expected.items():
        assert ours[k].dtype == dtype, k
        assert torch.equal(ours[k], v.to(dtype)), k


def test_mapping_of_the_controlnet_modules():
    """The gotchas: hint convs at even indices (SiLUs between), conv_out at the last one, zero convs' `.0`."""
    assert cldm_name("controlnet_cond_embedding.conv_in.weight", TINY_CONTROLNET) == "input_hint_block.0.weight"
    assert cldm_name("controlnet_cond_embedding.blocks.5.bias", TINY_CONTROLNET) == "input_hint_block.12.bias"
    assert cldm_name("controlnet_cond_embedding.conv_out.weight", TINY_CONTROLNET) == "input_hint_block.14.weight"
    assert cldm_name("controlnet_down_blocks.5.weight", TINY_CONTROLNET) == "zero_convs.5.0.weight"
    assert cldm_name("controlnet_mid_block.bias", TINY_CONTROLNET) == "middle_block_out.0.bias"
    assert cldm_name("down_blocks.0.downsamplers.0.conv.weight", TINY_CONTROLNET) == "input_blocks.3.0.op.weight"
    assert cldm_name("time_embedding.linear_2.bias", TINY_CONTROLNET) == "time_embed.2.bias"
    assert cldm_name("mid_block.resnets.1.norm1.weight", TINY_CONTROLNET) == "middle_block.2.in_layers.0.weight"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_controlnet_only_file_matches_diffusers_converter(tmp_path, reference, suffix, capsys):
    src = write_checkpoint(cldm_state_dict(reference), tmp_path / f"control_v11p_sd15_tiny{suffix}")
    assert main([str(src), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "single-file layout, float32 weights, variant controlnet-sd15" in printed
    assert "ControlNet (control_model.* keys): 3-channel control image, embedding widths [8, 16, 16, 32]" in printed
    assert "t2vz.load_controlnet" in printed
    ours = read_state_dict(tmp_path / "out", "controlnet")
    assert_same_tensors(ours, diffusers_conversion(src))
    assert_same_tensors(ours, reference.state_dict())
    meta = read_controlnet_config(tmp_path / "out")
    assert meta["format"] == "t2vz-controlnet" and meta["variant"] == "controlnet-sd15"
    assert t2vz.ControlNetConfig(**meta["controlnet"]) == TINY_CONTROLNET
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["controlnet.safetensors", "t2vz_model.json"]


def test_full_file_takes_only_the_control_model_part(tmp_path, reference):
    """control_sd15_*.pth: the ControlNet beside the whole SD model (and LDM's schedule buffers)."""
    full = {**tiny_ldm_checkpoint(), **cldm_state_dict(reference)}
    src = write_checkpoint(full, tmp_path / "control_sd15_tiny.ckpt")
    report = convert(src, tmp_path / "out", dtype="fp16")
    assert any("left out the" in n and "besides control_model.*" in n for n in report.notes), report.notes
    ours = read_state_dict(tmp_path / "out", "controlnet")
    assert_same_tensors(ours, diffusers_conversion(src), torch.float16)


def test_bare_cldm_keys_without_prefix(tmp_path, reference):
    src = write_checkpoint(cldm_state_dict(reference, prefix=""), tmp_path / "bare.safetensors")
    convert(src, tmp_path / "out")
    assert_same_tensors(read_state_dict(tmp_path / "out", "controlnet"), reference.state_dict())


@torch.no_grad()
def test_converted_folder_loads_and_matches_diffusers(tmp_path, reference):
    src = write_checkpoint(cldm_state_dict(reference), tmp_path / "cn.safetensors")
    convert(src, tmp_path / "out")
    ours = t2vz.load_controlnet(tmp_path / "out")
    assert isinstance(ours, t2vz.ControlNet) and not ours.training
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([981, 17])
    context, control = torch.randn(2, 77, TINY_CONTROLNET.cross_attention_dim), torch.rand(2, 3, 64, 96)
    ref_down, ref_mid = reference(x, t, context, control, conditioning_scale=0.7, return_dict=False)
    down, mid = ours(x, t, context, control, conditioning_scale=0.7)
    assert len(down) == len(ref_down) == 6
    for d, r in zip(down, ref_down):
        assert_parity(d, r)
    assert_parity(mid, ref_mid)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_diffusers_folder(tmp_path, reference, variant):
    folder = tmp_path / "controlnet"
    ref = reference.half() if variant else reference
    try:
        ref.save_pretrained(folder, variant=variant)
    finally:
        reference.float()
    report = convert(folder, tmp_path / "out")
    assert report.layout == "diffusers" and report.variant == "controlnet-sd15"
    assert report.source_dtype == ("float16" if variant else "float32")
    expected = {k: v.half() if variant else v for k, v in reference.state_dict().items()}
    assert_same_tensors(read_state_dict(tmp_path / "out", "controlnet"), expected)
    assert t2vz.load_controlnet(tmp_path / "out").config == TINY_CONTROLNET


def test_sd2_controlnet_file_refused(tmp_path, reference):
    for edit, why in (
        (lambda sd: sd.update({k: v[:, :, 0, 0] for k, v in sd.items() if "proj_in.weight" in k}), "linear proj_in"),
        (lambda sd: sd.update({k: torch.zeros(v.shape[0], 1024) for k, v in sd.items() if "attn2.to_k" in k}),
         "1024-dim cross-attention context"),
    ):
        sd = cldm_state_dict(reference)
        edit(sd)
        src = write_checkpoint(sd, tmp_path / "cn.safetensors")
        with pytest.raises(ConversionError, match=rf"is a Stable Diffusion 2\.x ControlNet \({why}.*SD 1\.5"):
            convert(src, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_sd2_controlnet_folder_refused(tmp_path, reference):
    reference.save_pretrained(tmp_path / "cn")
    cfg = tmp_path / "cn" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "cross_attention_dim": 1024}))
    with pytest.raises(ConversionError, match=r"Stable Diffusion 2\.x ControlNet \(1024-dim"):
        convert(tmp_path / "cn", tmp_path / "out")


def test_incomplete_controlnet_file_refused(tmp_path, reference):
    sd = cldm_state_dict(reference)
    del sd["control_model.zero_convs.2.0.weight"], sd["control_model.input_hint_block.14.bias"]
    src = write_checkpoint(sd, tmp_path / "cn.safetensors")
    with pytest.raises(ConversionError, match=r"2 missing keys: control_model\.input_hint_block\.14\.bias, "
                                              r"control_model\.zero_convs\.2\.0\.weight"):
        convert(src, tmp_path / "out")


def test_wrong_folder_kind_is_named(tmp_path, reference):
    src = write_checkpoint(cldm_state_dict(reference), tmp_path / "cn.safetensors")
    convert(src, tmp_path / "cn")
    sd_folder, _ = tiny_reference_folder(tmp_path / "sd")
    with pytest.raises(ModelFolderError, match=r"is a t2vz Stable Diffusion model folder, not a ControlNet folder; "
                                               r"load it with t2vz\.load"):
        t2vz.load_controlnet(sd_folder)
    with pytest.raises(ModelFolderError, match=r"is a t2vz ControlNet folder, not a Stable Diffusion model folder; "
                                               r"load it with t2vz\.load_controlnet"):
        t2vz.load(tmp_path / "cn")

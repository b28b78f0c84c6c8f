"""LoRA merging (t2vz/sd/lora.py) against diffusers' own loader: random LoRAs in kohya and diffusers/PEFT layouts
on tiny SD 1.5 and SDXL models, fused by `pipe.load_lora_weights` + `fuse_lora(lora_scale=...)` and merged by
t2vz, compared weight for weight (and, on SD 1.5, by the UNet's output). Text encoders, whose diffusers loader needs
a newer peft than the one the installed transformers accepts, are compared with the LoRA's definition merged by
hand: W + s·(α/r)·up·down. Then the refusals, and `lora=[FILE:SCALE]` on the command line reaching run.json."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_parity
from ldm_fixtures import UNET_RESNET, _rename, unet_blocks
from reference_models import (
    TINY_CLIP, TINY_SDXL_UNET, TINY_UNET, diffusers_sdxl_unet, stable_diffusion_pipeline, tiny_reference_folder,
)
from safetensors.torch import save_file

import t2vz
from t2vz.sd.lora import LoraError, merge_lora_tensors, parse_lora_entries
from t2vz.sd.model_folder import shipped_model_dir
from t2vz.sd.text_encoder import build_clip_text_model, canonical_clip_state_dict
from t2vz.sd.unet import UNetConfig

REPO = Path(__file__).resolve().parents[1]
SCALES = (0.6, 1.5)
RANK = 4

TINY_SDXL = TINY_SDXL_UNET  # three levels, no attention at the first, 1, 2, 3 transformer blocks deep, text_time
TINY_CLIP_2 = {**TINY_CLIP, "hidden_size": 32, "projection_dim": 32}


# ------------------------------------------------------------------------------------------------ random LoRAs
def lora_targets(sd: dict[str, torch.Tensor]) -> list[str]:
    """Every linear and convolution layer of a state dict (the modules with a 2-D or 4-D weight): attention
    projections, feed-forwards, 1×1 and 3×3 convolutions, the time and added embeddings' linears; not the text
    encoders' token and position embeddings or text projection, which LoRA trainers leave alone."""
    return [k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim in (2, 4)
            and "embeddings." not in k and "text_projection" not in k]


def random_factors(weight: torch.Tensor, gen: torch.Generator, rank: int = RANK):
    """(down, up) for a layer: linear factors for a linear, 1×1 for a 1×1 convolution, a k×k down and a 1×1 up
    (LoCon) for a k×k convolution."""
    out, inp = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    down = torch.randn(rank, inp, *kernel, generator=gen) / (inp * max(1, kernel[0] if kernel else 1)) ** 0.5
    up = torch.randn(out, rank, *((1, 1) if kernel else ()), generator=gen) * 0.3
    return down, up


def sgm_name(module: str, cfg: UNetConfig) -> str:
    """A diffusers UNet module → its SGM name, by the block walk of tests/ldm_fixtures.py (the SDXL add embedding
    added), independent of t2vz's `sgm_module`."""
    added = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    if module in added:
        return added[module]
    blocks = unet_blocks(cfg)
    if module in blocks:
        return blocks[module][0]
    prefix, rest, is_resnet = _rename(module + ".weight", blocks)
    rest = rest[: -len(".weight")]
    return f"{prefix}.{UNET_RESNET.get(rest, rest) if is_resnet else rest}"


def kohya_name(component: str, module: str, family: str, cfg: UNetConfig) -> str:
    if component == "unet":
        return "lora_unet_" + (sgm_name(module, cfg) if family == "sdxl" else module).replace(".", "_")
    prefix = {"sd15": "lora_te_", "sdxl": "lora_te1_"}[family] if component == "text_encoder" else "lora_te2_"
    return prefix + module.replace(".", "_")


def make_lora(state_dicts: dict, layout: str, family: str = "sd15", seed: int = 0, alphas: str | None = "uniform",
              cfg: UNetConfig = TINY_SDXL) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], tuple], dict]:
    """A random LoRA over every layer of every component, in `layout`: "kohya", "peft" (lora_A/lora_B),
    "diffusers_old" (lora.down/lora.up); α "uniform" (α = 2 = r/2 everywhere, as trainers write it: .alpha tensors,
    or for "peft" diffusers' `lora_adapter_metadata` header, which is where its loader reads a PEFT file's α),
    "varied" (.alpha tensors, α from 1 to 7 by layer) or None (no α: α = r). Returns its tensors, the definition
    (component, module) → (down, up, α or None), and the safetensors header metadata. `cfg`: the SDXL UNet's
    config, for its SGM names.

    diffusers' kohya converter keys the α of attention layers by their old processor names, which PEFT then fails
    to match (its warning: "alpha_pattern keys did not match any targeted module"), so varied α is checked against
    the definition only."""
    gen = torch.Generator().manual_seed(seed)
    tensors, layers, metadata = {}, {}, {}
    in_header = layout == "peft" and alphas == "uniform"
    for component, sd in state_dicts.items():
        for i, module in enumerate(lora_targets(sd)):
            down, up = random_factors(sd[module + ".weight"], gen)
            alpha = {"uniform": RANK / 2, "varied": float(1 + i % 7), None: None}[alphas]
            layers[(component, module)] = (down, up, alpha)
            if layout == "kohya":
                name = kohya_name(component, module, family, cfg)
                tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
            else:
                a, b = {"peft": ("lora_A.weight", "lora_B.weight"),
                        "diffusers_old": ("lora.down.weight", "lora.up.weight")}[layout]
                name = f"{component}.{module}"
                tensors |= {f"{name}.{a}": down, f"{name}.{b}": up}
            if alpha is not None and not in_header:
                tensors[f"{name}.alpha"] = torch.tensor(alpha)
        if in_header:
            metadata |= peft_config(component, sd, RANK / 2)
    return tensors, layers, ({"lora_adapter_metadata": json.dumps(metadata)} if metadata else {})


def peft_config(component: str, sd: dict, alpha: float, **fields) -> dict:
    """The LoraConfig fields diffusers writes into the header, under the component's prefix."""
    config = {"r": RANK, "lora_alpha": alpha, "target_modules": lora_targets(sd), **fields}
    return {f"{component}.{k}": v for k, v in config.items()}


def merged_by_hand(sd: dict, component: str, layers: dict, scale: float) -> dict[str, torch.Tensor]:
    """The LoRA's definition: W + s·(α/r)·up·down for each of `component`'s layers."""
    out = dict(sd)
    for (c, module), (down, up, alpha) in layers.items():
        if c == component:
            w = sd[module + ".weight"]
            rank = down.shape[0]
            ratio = (rank if alpha is None else alpha) / rank
            out[module + ".weight"] = w + scale * ratio * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    return out


def fused_by_diffusers(pipe, tensors: dict, scale: float, metadata: dict, folder: Path) -> dict[str, torch.Tensor]:
    """The UNet state dict after diffusers' `load_lora_weights` + `fuse_lora(lora_scale=scale)` of the LoRA's UNet
    tensors (written to a file with the header `metadata`, which diffusers reads only from a file); PEFT's wrapper
    names (`.base_layer.`) dropped."""
    unet_only = {k: v for k, v in tensors.items() if k.startswith(("lora_unet_", "unet."))}
    save_file(unet_only, folder / "unet_lora.safetensors", metadata=metadata)
    pipe.load_lora_weights(str(folder / "unet_lora.safetensors"))
    pipe.fuse_lora(components=["unet"], lora_scale=scale)
    return {k.replace(".base_layer", ""): v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" not in k}


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        assert_parity(actual[key].float(), expected[key].float())


def only(tensors: dict, prefixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in tensors.items() if k.startswith(prefixes)}


# --------------------------------------------------------------------------------------------------- SD 1.5
@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder, refs = tiny_reference_folder(tmp_path_factory.mktemp("sd15") / "model")
    unet, _, clip = refs
    state = {"unet": {k: v.clone() for k, v in unet.state_dict().items()},
             "text_encoder": canonical_clip_state_dict(clip.state_dict())}
    return folder, refs, state


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_sd15_merge_matches_diffusers_fuse_lora(sd15, tmp_path, layout, scale):
    """t2vz.load(lora=...) on a LoRA over every UNet and text-encoder layer: the UNet's weights are diffusers'
    fused ones and its output theirs; the text encoder's weights are the definition merged by hand."""
    folder, (ref_unet, ref_vae, ref_clip), state = sd15
    tensors, layers, metadata = make_lora(state, layout)
    file = tmp_path / "lora.safetensors"
    save_file(tensors, file, metadata=metadata)
    model = t2vz.load(folder, lora=[(file, scale)])

    pipe = stable_diffusion_pipeline(copy.deepcopy(ref_unet), ref_vae, ref_clip)
    expected = fused_by_diffusers(pipe, tensors, scale, metadata, tmp_path)
    assert_same_weights(model.unet.state_dict(), expected)
    assert_same_weights(canonical_clip_state_dict(model.text_encoder.model.state_dict()),
                        merged_by_hand(state["text_encoder"], "text_encoder", layers, scale))

    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, TINY_UNET.cross_attention_dim)
    with torch.no_grad():
        assert_parity(model.unet(x, 500, context), pipe.unet(x, 500, context).sample)
        changed = ref_unet(x, 500, context).sample
    assert (model.unet(x, 500, context) - changed).abs().max() > 1e-2  # the LoRA did change the output
    assert model.lora == [{"file": str(file), "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                           "scale": scale}]


def test_sd15_peft_alpha_pattern_from_diffusers_metadata(sd15, tmp_path):
    """α by module from the PEFT config in diffusers' header: `alpha_pattern` over `lora_alpha`."""
    folder, (ref_unet, ref_vae, ref_clip), state = sd15
    tensors, layers, _ = make_lora({"unet": state["unet"]}, "peft", alphas=None)
    config = peft_config("unet", state["unet"], 3.0, alpha_pattern={"attn2.to_k": 6.0})
    metadata = {"lora_adapter_metadata": json.dumps(config)}
    save_file(tensors, tmp_path / "lora.safetensors", metadata=metadata)
    model = t2vz.load(folder, lora=[(tmp_path / "lora.safetensors", 0.8)])
    pipe = stable_diffusion_pipeline(copy.deepcopy(ref_unet), ref_vae, ref_clip)
    assert_same_weights(model.unet.state_dict(), fused_by_diffusers(pipe, tensors, 0.8, metadata, tmp_path))
    by_hand = {key: (down, up, 6.0 if key[1].endswith("attn2.to_k") else 3.0)
               for key, (down, up, _) in layers.items()}
    assert_same_weights(model.unet.state_dict(), merged_by_hand(state["unet"], "unet", by_hand, 0.8))


def test_sd15_older_diffusers_names_and_two_loras_add(sd15):
    """`lora.down`/`lora.up` names (no α: α = r), a kohya LoRA with α by layer, and both merged: they add."""
    _, _, state = sd15
    first, layers_1, _ = make_lora(state, "diffusers_old", seed=1, alphas=None)
    second, layers_2, _ = make_lora(state, "kohya", seed=2, alphas="varied")
    merged = merge_lora_tensors(merge_lora_tensors(state, TINY_UNET, first, 0.5), TINY_UNET, second, -1.0)
    for component in state:
        expected = merged_by_hand(merged_by_hand(state[component], component, layers_1, 0.5), component,
                                  layers_2, -1.0)
        assert_same_weights(merged[component], expected)


def test_sd15_processor_names_of_the_first_diffusers_format(sd15):
    _, _, state = sd15
    gen = torch.Generator().manual_seed(0)
    attention = "down_blocks.0.attentions.1.transformer_blocks.0.attn2"
    tensors, layers = {}, {}
    for proj, module in (("to_k", "to_k"), ("to_out", "to_out.0")):
        down, up = random_factors(state["unet"][f"{attention}.{module}.weight"], gen)
        tensors |= {f"unet.{attention}.processor.{proj}_lora.down.weight": down,
                    f"unet.{attention}.processor.{proj}_lora.up.weight": up}
        layers[("unet", f"{attention}.{module}")] = (down, up, None)
    merged = merge_lora_tensors(state, TINY_UNET, tensors, 2.0)
    assert_same_weights(merged["unet"], merged_by_hand(state["unet"], "unet", layers, 2.0))


def test_merging_is_float32_before_the_cast(sd15, tmp_path):
    """In bfloat16 the merged weights are the float32 merge cast once, not a bfloat16 sum."""
    folder, _, state = sd15
    tensors, layers, _ = make_lora(state, "kohya")
    save_file(tensors, tmp_path / "lora.safetensors")
    model = t2vz.load(folder, dtype=torch.bfloat16, lora=[(tmp_path / "lora.safetensors", 0.6)])
    expected = merged_by_hand(state["unet"], "unet", layers, 0.6)
    for key, value in model.unet.state_dict().items():
        assert torch.equal(value, expected[key].to(torch.bfloat16)), key


# ----------------------------------------------------------------------------------------------------- SDXL
@pytest.fixture(scope="module")
def sdxl():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    unet = diffusers_sdxl_unet(TINY_SDXL)
    clip_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_2))
    state = {"unet": {k: v.clone() for k, v in unet.state_dict().items()},
             "text_encoder": canonical_clip_state_dict(build_clip_text_model(TINY_CLIP).state_dict()),
             "text_encoder_2": clip_2.state_dict()}  # text_model.* and text_projection
    return unet, state


def sdxl_pipeline(unet):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_sdxl_merge_matches_diffusers_fuse_lora(sdxl, tmp_path, layout, scale):
    """kohya SDXL files name UNet layers the SGM way (input_blocks_4_1_transformer_blocks_1_attn2_to_k) and the
    text encoders lora_te1_/lora_te2_; PEFT files use diffusers' names. diffusers converts the kohya names itself."""
    state = sdxl[1]
    tensors, layers, metadata = make_lora(state, layout, family="sdxl")
    if layout == "kohya":
        assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    merged = merge_lora_tensors(state, TINY_SDXL, tensors, scale, metadata)
    expected = fused_by_diffusers(sdxl_pipeline(copy.deepcopy(sdxl[0])), tensors, scale, metadata, tmp_path)
    assert_same_weights(merged["unet"], expected)
    for component in ("text_encoder", "text_encoder_2"):
        assert_same_weights(merged[component], merged_by_hand(state[component], component, layers, scale))


def test_sdxl_model_folder_loads_with_loras(tmp_path):
    """t2vz.load of a converted SDXL file with a kohya LoRA: the UNet is diffusers' fused one, both text encoders the
    definition; an SD 1.5 LoRA on it is refused."""
    from ldm_fixtures import write_checkpoint
    from sdxl_fixtures import TINY_SDXL_FILE_UNET, tiny_sdxl_checkpoint, tiny_sdxl_models

    from weights_convert.convert import convert

    ref_unet, _, ref_l, ref_g = tiny_sdxl_models()  # the models tiny_sdxl_checkpoint() holds
    convert(write_checkpoint(tiny_sdxl_checkpoint(), tmp_path / "sd_xl.safetensors"), tmp_path / "model")
    state = {"unet": ref_unet.state_dict(), "text_encoder": canonical_clip_state_dict(ref_l.state_dict()),
             "text_encoder_2": canonical_clip_state_dict(ref_g.state_dict())}
    tensors, layers, _ = make_lora(state, "kohya", family="sdxl", cfg=TINY_SDXL_FILE_UNET)
    model = t2vz.load(tmp_path / "model", lora=[(lora_file(tmp_path, tensors), 0.7)])
    assert_same_weights(model.unet.state_dict(),
                        fused_by_diffusers(sdxl_pipeline(copy.deepcopy(ref_unet)), tensors, 0.7, {}, tmp_path))
    for component, encoder in (("text_encoder", model.text_encoder.encoder_1),
                               ("text_encoder_2", model.text_encoder.encoder_2)):
        assert_same_weights(canonical_clip_state_dict(encoder.state_dict()),
                            merged_by_hand(state[component], component, layers, 0.7))
    sd15_lora, _, _ = make_lora({"text_encoder": state["text_encoder"]}, "kohya")
    with pytest.raises(LoraError, match="made for SD 1.5, the model is SDXL"):
        t2vz.load(tmp_path / "model", lora=[lora_file(tmp_path, sd15_lora, "sd15.safetensors")])


# ------------------------------------------------------------------------------------------------- refusals
def lora_file(tmp_path: Path, tensors: dict, name: str = "lora.safetensors") -> Path:
    save_file(tensors, tmp_path / name)
    return tmp_path / name


def test_refuses_a_lora_of_the_other_family(sd15, sdxl, tmp_path):
    _, _, state = sd15
    sdxl_lora, _, _ = make_lora(sdxl[1], "kohya", family="sdxl")
    with pytest.raises(LoraError, match="made for SDXL, the model is SD 1.5"):
        merge_lora_tensors(state, TINY_UNET, sdxl_lora, 1.0)
    with pytest.raises(LoraError, match="made for SDXL, the model is SD 1.5"):
        merge_lora_tensors(state, TINY_UNET, only(sdxl_lora, ("lora_unet_",)), 1.0)  # by the SGM names alone
    sd15_lora, _, _ = make_lora(state, "kohya")
    with pytest.raises(LoraError, match="made for SD 1.5, the model is SDXL"):
        merge_lora_tensors(sdxl[1], TINY_SDXL, sd15_lora, 1.0)
    to_k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # by the text width alone
    for width, family in ((768, "SD 1.5"), (2048, "SDXL")):
        model, cfg = (sdxl[1], TINY_SDXL) if width == 768 else (state, TINY_UNET)
        with pytest.raises(LoraError, match=f"made for {family}, the model is"):
            merge_lora_tensors(model, cfg, {f"{to_k}.lora_A.weight": torch.zeros(4, width),
                                            f"{to_k}.lora_B.weight": torch.zeros(64, 4)}, 1.0)


def test_refuses_keys_that_match_no_layer_and_shapes_that_do_not_fit(sd15, tmp_path):
    _, _, state = sd15
    down, up = torch.zeros(4, 32), torch.zeros(32, 4)
    with pytest.raises(LoraError, match=r"does not match the model: 1 of its layers .*lora_unet_down_blocks_9"):
        merge_lora_tensors(state, TINY_UNET, {"lora_unet_down_blocks_9_proj_in.lora_down.weight": down,
                                              "lora_unet_down_blocks_9_proj_in.lora_up.weight": up}, 1.0)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    with pytest.raises(LoraError, match=r"down \(4, 32\), up \(16, 4\)\) does not fit .* of shape \(32, 32\)") as e:
        merge_lora_tensors(state, TINY_UNET, {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up[:16]}, 1.0)
    with pytest.raises(LoraError, match="does not fit"):
        merge_lora_tensors(state, TINY_UNET, {f"{key}.lora_A.weight": torch.zeros(4, 48),
                                              f"{key}.lora_B.weight": up}, 1.0)
    with pytest.raises(LoraError, match="LoHa"):
        merge_lora_tensors(state, TINY_UNET, {"lora_unet_conv_in.hada_w1_a": down}, 1.0)
    with pytest.raises(LoraError, match="full weight diff"):
        merge_lora_tensors(state, TINY_UNET, {"lora_unet_conv_in.diff": down}, 1.0)
    with pytest.raises(LoraError, match="keys of no LoRA layout .* model.diffusion_model.conv_in.weight"):
        merge_lora_tensors(state, TINY_UNET, {"model.diffusion_model.conv_in.weight": down}, 1.0)  # a checkpoint
    with pytest.raises(LoraError, match="without its up matrix"):
        merge_lora_tensors(state, TINY_UNET, {f"{key}.lora_A.weight": down}, 1.0)
    assert e.value.args[0].count("\n") == 0


def test_refuses_files_and_scales(sd15, tmp_path):
    folder, _, state = sd15
    with pytest.raises(LoraError, match="nothing.safetensors does not exist"):
        t2vz.load(folder, lora=[(tmp_path / "nothing.safetensors", 1.0)])
    for bad in (float("nan"), float("inf"), "0.5", True):
        with pytest.raises(LoraError, match="must be a finite number"):
            t2vz.load(folder, lora=[(tmp_path / "x.safetensors", bad)])
    torch.save({"a": torch.zeros(1), "b": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(LoraError, match="is a pickle holding Python objects"):
        t2vz.load(folder, lora=[(tmp_path / "evil.pt", 1.0)])
    tensors, layers, _ = make_lora({"unet": state["unet"]}, "kohya")
    torch.save(tensors, tmp_path / "plain.pt")  # a pickle of plain tensors loads with weights_only=True
    model = t2vz.load(folder, lora=[(tmp_path / "plain.pt", 1.0)])
    assert_same_weights(model.unet.state_dict(), merged_by_hand(state["unet"], "unet", layers, 1.0))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo PAYLOAD-RAN",))


@pytest.mark.parametrize("entry, expected", [
    ("a.safetensors", ("a.safetensors", 1.0)), ("dir/b.safetensors:0.5", ("dir/b.safetensors", 0.5)),
    ("c.safetensors:-1e-1", ("c.safetensors", -0.1)),
])
def test_command_line_entries(entry, expected):
    (lora,) = parse_lora_entries([entry])
    assert (str(lora.file), lora.scale) == expected


@pytest.mark.parametrize("entry, message", [("a.safetensors:strong", "'strong' is not a number"),
                                            ("a.safetensors:nan", "must be a finite number"),
                                            (":0.5", "has no file")])
def test_command_line_entries_refused(entry, message):
    with pytest.raises(LoraError, match=message) as info:
        parse_lora_entries([entry])
    assert repr(entry) in str(info.value)


# ------------------------------------------------------------------------------------------------- commands
def toyworld_lora(path: Path) -> dict:
    """A kohya LoRA over every layer of the shipped toy model, and its definition."""
    from safetensors.torch import load_file

    toy = shipped_model_dir("toyworld")
    state = {"unet": load_file(toy / "unet.safetensors"),
             "text_encoder": canonical_clip_state_dict(load_file(toy / "text_encoder.safetensors"))}
    tensors, _, _ = make_lora(state, "kohya")
    save_file(tensors, path)
    return tensors


def test_python_m_t2vz_records_the_lora_in_run_json(tmp_path):
    lora = tmp_path / "toy lora.safetensors"
    toyworld_lora(lora)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    common = ["prompt=a red circle", "video.num_frames=2", "sampler.num_inference_steps=3", "method.t0=1",
              "method.t1=1", "output.formats=[gif]", "output.progress=false"]
    for run, extra in (("with", [f"lora=[{lora}:0.5]"]), ("without", [])):
        proc = subprocess.run([sys.executable, "-m", "t2vz", *common, *extra, f"hydra.run.dir={tmp_path / run}"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "with" / "run.json").read_text())
    assert info["lora"] == [{"file": str(lora), "sha256": hashlib.sha256(lora.read_bytes()).hexdigest(),
                             "scale": 0.5}]
    assert "lora" not in json.loads((tmp_path / "without" / "run.json").read_text())
    with_lora = (tmp_path / "with" / "video.gif").read_bytes()
    assert with_lora != (tmp_path / "without" / "video.gif").read_bytes()  # the LoRA changed the video


def test_text_to_image_cli_takes_loras(tmp_path):
    from t2vz.experiment.cli import text_to_image_main

    lora = tmp_path / "toy.safetensors"
    toyworld_lora(lora)
    args = ["a red circle", "--steps", "2", "--height", "32", "--width", "32"]
    assert text_to_image_main([*args, "--out", str(tmp_path / "a.png"), "--lora", f"{lora}:0.5"]) == 0
    assert text_to_image_main([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    assert text_to_image_main([*args, "--out", str(tmp_path / "c.png"), "--lora", f"{lora}:x"]) == 2
    assert not (tmp_path / "c.png").exists()


def test_conditional_runs_record_their_loras(tmp_path):
    """ControlVideo and Video Instruct-Pix2Pix jobs take `lora` like text-to-video; run.json records it."""
    import time

    from t2vz.experiment.conditional_runs import ControlExperimentConfig, InstructExperimentConfig
    from t2vz.experiment.run import write_run

    lora = lora_file(tmp_path, {"lora_unet_conv_in.lora_down.weight": torch.ones(1, 4, 3, 3),
                                "lora_unet_conv_in.lora_up.weight": torch.ones(32, 1, 1, 1)})
    config = ControlExperimentConfig(prompt="x", model="m", controlnet="c", lora=[f"{lora}:0.25"])
    config.output.formats = ["gif"]
    write_run(tmp_path / "run", torch.zeros(2, 8, 8, 3), config, "", time.perf_counter())
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["lora"] == [{"file": str(lora), "sha256": hashlib.sha256(lora.read_bytes()).hexdigest(),
                             "scale": 0.25}]
    with pytest.raises(LoraError, match="the scale 'x' is not a number"):
        InstructExperimentConfig(instruction="x", model="m", lora=[f"{lora}:x"])

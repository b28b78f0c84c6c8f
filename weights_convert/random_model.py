"""Write a t2vz model folder with random weights: `tiny` (seconds on CPU), the full `sd15` shapes, or `sdxl-tiny`
(an SDXL-shaped model: two text encoders, the text_time added embedding, 64-channel heads).

For demos, tests and benchmarks where no trained weights exist (SD 1.5 cannot be downloaded everywhere). The
images such a model makes are noise: it proves the code runs, not that it draws.

    python -m weights_convert.random_model models/random-tiny --size tiny
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from t2vz.sd.model_folder import ModelFolderError, write_model_folder
from t2vz.sd.text_encoder import (
    SDXL_TOKENIZER_2_CONFIG, build_clip_text_model, canonical_clip_state_dict, shipped_tokenizer_dir,
)
from t2vz.sd.unet import UNet, UNetConfig
from t2vz.sd.vae import AutoencoderKL, VAEConfig

SIZES = {
    "tiny": dict(
        unet=UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), cross_attention_dim=32),
        vae=VAEConfig(block_out_channels=(32, 32, 64, 64)),  # four levels: 8× downsampling, as in SD 1.5
        text_encoder=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, projection_dim=32),
    ),
    "sdxl-tiny": dict(
        unet=UNetConfig(block_out_channels=(64, 128), attention_levels=(False, True), num_attention_heads=(1, 2),
                        transformer_layers_per_block=(1, 2), cross_attention_dim=64, use_linear_projection=True,
                        addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=32 + 6 * 8),
        vae=VAEConfig(block_out_channels=(32, 32, 64, 64), scaling_factor=0.13025),
        text_encoder=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, projection_dim=32),
        text_encoder_2=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                            layer_norm_eps=1e-5, projection_dim=32),
    ),
    "sd15": dict(
        unet=UNetConfig(),
        vae=VAEConfig(),
        text_encoder=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, projection_dim=768),
    ),
}


def write_random_model(out: str, size: str = "tiny", seed: int = 0, overwrite: bool = False):
    """Initialise the three components with PyTorch's / transformers' default init under `seed` and write them."""
    if size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {sorted(SIZES)}")
    spec = SIZES[size]
    torch.manual_seed(seed)
    state_dicts = {
        "unet": UNet(spec["unet"]).state_dict(),
        "vae": AutoencoderKL(spec["vae"]).state_dict(),
        "text_encoder": canonical_clip_state_dict(build_clip_text_model(spec["text_encoder"]).state_dict()),
    }
    config = {
        "unet": dataclasses.asdict(spec["unet"]),
        "vae": dataclasses.asdict(spec["vae"]),
        "text_encoder": dict(spec["text_encoder"]),
        "source": {"layout": "random", "size": size, "seed": seed},
        "variant": "sd15",
    }
    if "text_encoder_2" not in spec:
        return write_model_folder(out, state_dicts, config, shipped_tokenizer_dir(), overwrite=overwrite)
    bigg = build_clip_text_model(spec["text_encoder_2"], projection=True)
    state_dicts["text_encoder_2"] = canonical_clip_state_dict(bigg.state_dict())
    config.update(family="sdxl", variant="sdxl", sample_size=1024, text_encoder_2=dict(spec["text_encoder_2"]))
    with tempfile.TemporaryDirectory() as tok_2:  # the shipped vocabulary, padding with "!"
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(shipped_tokenizer_dir() / name, Path(tok_2) / name)
        (Path(tok_2) / "tokenizer_config.json").write_text(json.dumps(SDXL_TOKENIZER_2_CONFIG, indent=2) + "\n")
        return write_model_folder(out, state_dicts, config, shipped_tokenizer_dir(), overwrite=overwrite,
                                  tokenizer_2_dir=tok_2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_convert.random_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="model folder to write")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = write_random_model(args.out, args.size, args.seed, args.overwrite)
    except (ModelFolderError, OSError) as e:
        print(f"random_model: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a random {args.size} model to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

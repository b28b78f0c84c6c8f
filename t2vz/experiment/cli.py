"""Command-line entry points that are not Hydra jobs: `t2vz-text-to-image`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..method.text_to_image import text_to_image
from ..sd.loading import DTYPES, load
from ..sd.lora import parse_lora_entries
from ..sd.model_folder import ModelFolderError
from ..video_io import write_image

def text_to_image_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t2vz-text-to-image",
        description="Generate one image from a prompt with a converted SD 1.5 model folder "
        "(convert checkpoints with `python -m weights_convert SRC OUT`).",
    )
    parser.add_argument("prompt")
    parser.add_argument("--model", default="toyworld", help="t2vz model folder, or toyworld (default: toyworld)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA file merged into the model at SCALE (default 1.0); repeat for several")
    parser.add_argument("--out", default="image.png", help="output PNG (default: image.png)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's own size)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the model's own size)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    try:
        sd = load(args.model, device=args.device, dtype=dtype, lora=parse_lora_entries(args.lora))
        image = text_to_image(sd, args.prompt, height=args.height, width=args.width,
                              num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                              negative_prompt=args.negative_prompt,
                              generator=torch.Generator().manual_seed(args.seed))
        write_image(Path(args.out), image)
    except (ModelFolderError, ValueError, OSError) as e:
        print(f"t2vz-text-to-image: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(text_to_image_main())

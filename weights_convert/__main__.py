"""python -m weights_convert SRC OUT: an SD 1.x or SDXL base checkpoint → a t2vz model folder (see the package
docstring)."""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from t2vz.sd.model_folder import ModelFolderError

from weights_convert.checkpoint_io import ConversionError
from weights_convert.convert import DTYPES, convert

DESCRIPTION = """\
Convert a Stable Diffusion 1.x or SDXL base checkpoint into a t2vz model folder (read by t2vz.load).

SRC may be
  - an original single-file checkpoint: .safetensors, or .ckpt/.pt/.pth holding plain tensors
    (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*), fp32 or fp16,
    with or without EMA weights (model_ema.*: used by default);
  - a diffusers folder with unet/, vae/, text_encoder/ (and tokenizer/, scheduler/), weights as
    .safetensors or .bin, fp32 or the .fp16 variant;
  - an SDXL base model: a single file (sd_xl_base_1.0.safetensors: model.diffusion_model.*,
    first_stage_model.*, conditioner.embedders.0.transformer.* CLIP ViT-L and
    conditioner.embedders.1.model.* OpenCLIP ViT-bigG), fp32 or fp16, or a diffusers folder that
    also has text_encoder_2/ and tokenizer_2/;
  - an SD 1.x ControlNet: a single file with control_model.* keys (ControlNet only, or beside a whole
    SD model, which is left out), or a diffusers ControlNetModel folder (config.json +
    diffusion_pytorch_model.safetensors); written as a ControlNet folder for t2vz.load_controlnet.
SD 1.x text-to-image and InstructPix2Pix models convert; inpainting with --allow-inpainting.
SDXL base converts; the SDXL refiner, SDXL inpainting and SDXL ControlNets are refused, as is SD 2.x,
with a message saying so.
"""
EXAMPLES = """\
examples:
  python -m weights_convert v1-5-pruned-emaonly.safetensors models/sd15
  python -m weights_convert ./stable-diffusion-v1-5 models/sd15 --dtype fp16
  python -m weights_convert sd_xl_base_1.0.safetensors models/sdxl --dtype fp16
  python -m weights_convert instruct-pix2pix-00-22000.ckpt models/ip2p --overwrite
  python -m weights_convert control_v11p_sd15_canny.pth models/controlnet-canny
"""


PATH_ERRORS = {errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m weights_convert", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="checkpoint file or diffusers folder")
    p.add_argument("out", metavar="OUT", help="model folder to write (written atomically)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="folder with CLIP's vocab.json and merges.txt (default: the diffusers folder's tokenizer/, "
                        "else the one shipped with t2vz); SDXL's second tokenizer is the same vocabulary padding "
                        "with \"!\" (or the folder's own tokenizer_2/)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the written weights (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-inpainting", action="store_true", help="convert inpainting models (9 input channels)")
    p.add_argument("--no-ema", dest="prefer_ema", action="store_false",
                   help="take a single file's live UNet weights instead of its EMA weights")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns 0, or 2 with one line on stderr when the checkpoint cannot be converted or OUT
    cannot be written there (1 when the machine fails the write, e.g. a full disk)."""
    args = parse_args(argv)
    try:
        report = convert(args.src, args.out, tokenizer=args.tokenizer, dtype=args.dtype, overwrite=args.overwrite,
                         allow_inpainting=args.allow_inpainting, prefer_ema=args.prefer_ema)
    except (ConversionError, ModelFolderError) as e:
        print(f"weights_convert: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path under a file, permissions, disk full: the folder was not written
        blocking = next((p for p in Path(args.out).parents if p.exists()), None)
        why = (f"{blocking} is a file, not a folder" if blocking is not None and blocking.is_file()
               else f"{e.strerror or e}" + (f" ({e.filename})" if getattr(e, "filename", None) else ""))
        print(f"weights_convert: error: cannot write {args.out}: {why}; nothing was written", file=sys.stderr)
        return 2 if e.errno in PATH_ERRORS else 1  # a path the user can fix, or the machine (a full disk)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

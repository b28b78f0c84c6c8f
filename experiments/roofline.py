"""The UNet's roofline on this machine: its forward's throughput against its own kernels timed alone.

    python experiments/roofline.py                          # SD 1.5 UNet shapes, fp32 and bf16, 32x32 latent, batch 4
    python experiments/roofline.py --dtypes bf16 --latent 16 --batch 8 --repeats 3
    python experiments/roofline.py --model tiny --dtypes fp32

For each dtype: one UNet forward (random weights of the chosen shapes, t2vz's own UNet as `t2vz.load` sets it up
for that dtype and device: on the CPU, reduced precision runs channels-last) is timed (median of --repeats). Its
convolutions, matmuls and attention kernels are recorded and each is timed alone at the same shapes, strides and
dtype (t2vz/experiment/roofline.py). Printed per dtype: the forward's time and GFLOP/s (torch's FlopCounterMode),
the kernels' summed time alone and its GFLOP/s, and their ratio, i.e. the fraction of its own kernels'
throughput that the forward reaches (1.0: nothing but those kernels). Also the machine's matmul peak (2048^3),
so the table shows how close to the hardware the kernels themselves are.
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from reference_models import SD15_UNET, TINY_UNET

from t2vz.experiment.benchmark import machine_info
from t2vz.experiment.roofline import matmul_peak_flops, roofline
from t2vz.sd.loading import DTYPES, prepare_for_device
from t2vz.sd.unet import UNet


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("sd15", "tiny"), default="sd15", help="UNet shapes (default: sd15)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--latent", type=int, default=32, help="latent height = width (default 32: 256x256 pixels)")
    p.add_argument("--batch", type=int, default=4, help="UNet batch: frames x 2 guidance branches (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, median reported (default 5)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    for name in ("latent", "batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    cfg = {"sd15": SD15_UNET, "tiny": TINY_UNET}[args.model]
    torch.manual_seed(0)
    base = UNet(cfg).eval().requires_grad_(False)
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        unet = prepare_for_device(base.to(device=device, dtype=dtype), device, dtype)
        x = torch.randn(args.batch, cfg.in_channels, args.latent, args.latent, device=device, dtype=dtype)
        context = torch.randn(args.batch, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
        result = roofline(lambda: unet(x, 500, context), args.repeats, sync)
        peak = matmul_peak_flops(dtype, device=device, sync=sync)
        rows.append((name, result, peak))
        print(f"{name}: forward {result['forward_s']:.3f} s, kernels alone {result['kernels_s']:.3f} s", flush=True)
    print()
    print("| dtype | forward (s) | forward GFLOP/s | kernels alone (s) | kernels GFLOP/s | forward / kernels "
          "throughput | matmul 2048³ GFLOP/s | forward / matmul peak | kernel time by kind (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r, peak in rows:
        gflop = r["flops"] / 1e9
        kinds = ", ".join(f"{k} {v['seconds']:.3f} ({v['calls']})" for k, v in sorted(r["kinds"].items()))
        print(f"| {name} | {r['forward_s']:.3f} | {gflop / r['forward_s']:.0f} | {r['kernels_s']:.3f} | "
              f"{gflop / r['kernels_s']:.0f} | {r['kernel_fraction']:.0%} | {peak / 1e9:.0f} | "
              f"{gflop / r['forward_s'] / (peak / 1e9):.0%} | {kinds} |")
    machine = machine_info(device)
    gflop = rows[0][1]["flops"] / 1e9
    print(f"\n{args.model} UNet, latent {args.latent}x{args.latent}, batch {args.batch}, {gflop:.1f} GFLOP per forward; "
          f"median of {args.repeats}; {machine['cpu']}, {machine['torch_threads']} threads, torch {torch.__version__}, "
          f"{platform.platform()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

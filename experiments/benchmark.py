"""Benchmark t2vz against diffusers' TextToVideoZeroPipeline: same random weights, prompt, seed and settings.

    python experiments/benchmark.py                                  # preset=small: tiny model, CPU, ~3 min
    python experiments/benchmark.py preset=sd15-small-res            # full SD 1.5 shapes at 64x64, CPU
    python experiments/benchmark.py preset=sd15-512                  # SD 1.5 shapes, 512x512, 50 steps, CUDA fp16
    python experiments/benchmark.py preset=small repeats=5 num_frames=4 threads=1
    python experiments/benchmark.py --cfg job                        # every option with its value

What it does:
  1. One random init of the model (`model=tiny|sd15`, seed `model_seed`) is written as a diffusers folder
     (UNet2DConditionModel, AutoencoderKL, transformers CLIPTextModel, t2vz's shipped CLIP tokenizer files and
     SD 1.5's DDIMScheduler; experiments/bench_reference.py), then converted with t2vz's converter
     (`weights_convert.convert.convert`, what `python -m weights_convert` runs). Both are cached under
     `workdir` (default runs/benchmark/MODEL-seedSEED/{diffusers,t2vz}/) and reused by later runs.
  2. t2vz loads the converted folder (`TextToVideoZero.from_pretrained`); diffusers loads the original one
     (`TextToVideoZeroPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
     requires_safety_checker=False)`, local files only). Both generate the same video: same prompt, seed (a CPU
     torch.Generator), frames, size, DDIM steps, guidance, motion λ (t2vz's motion_strength along δ = (1, 1) =
     diffusers' motion_field_strength_x = _y), t0, t1; t2vz with ddpm_marginal="reference", so that its frames
     equal diffusers' (the default "exact" marginal deliberately differs, see docs/method.md).
  3. `repeats` rounds; every round runs each implementation once, alternating which goes first (round 1:
     t2vz then diffusers, round 2: diffusers then t2vz, ...). Every run is a fresh Python subprocess
     (this file with --worker), so that its peak memory is its own. Inside it: import, load the model (timed:
     `load`), warm up with one generation (same prompt, frames and size: first calls, kernel selection,
     allocator growth, compilation), reset the memory peak, then time one full generation (`wall`, from the
     prompt to frames on the CPU, with CUDA synchronised). Loading is excluded from `wall`.
     The warm-up must take every path the timed run takes (warmup_settings): eager, `warmup_steps` DDIM steps,
     at least 4 with feature caching (cN), so that each of its denoising loops runs a full and a cached UNet
     pass, on frame 1 alone and on all frames; with compile=true, the timed run's own settings, since compiled
     graphs are specialised on the batch size, on full vs cached passes and on values that turn dynamic only
     after a recompile, and only a run of the same length is sure to meet all of them.
  4. One more t2vz subprocess counts the run's FLOPs with torch.utils.flop_counter.FlopCounterMode
     (matmuls, convolutions, attention; not elementwise ops), untimed.
  5. Writes benchmark.md, benchmark.csv (one row per implementation) and benchmark.json (every run, the machine)
     into Hydra's output folder (outputs/DATE/TIME/, or hydra.run.dir=PATH), with worker logs under runs/, and
     prints the Markdown table.

What is measured:
  wall          median over the rounds of the timed generation, seconds
  UNet calls    counted with a forward hook on the UNet in the timed run. Text2Video-Zero runs DDIM on frame 1
                alone from T to T0 (n - t0 - 1 steps), then on every frame, frame 1 included, from T1 to 0
                (t1 + 1 steps): n + t1 - t0 steps, 53 at n=50, t0=44, t1=47, not n. Each step is one UNet call
                whose batch holds the unconditional and the text branch (2 rows for frame 1, 2 x frames after).
  s / step      wall / UNet calls (text encoding and VAE decoding included in wall, so slightly pessimistic)
  peak memory   CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak RSS (Linux VmHWM, which is what
                getrusage(RUSAGE_SELF).ru_maxrss reports in a process that was not spawned by a big one: a child's
                ru_maxrss also carries its parent's peak, so it is not used on Linux). Both are reset after the
                warm-up, so the peak is the timed run's: weights, libraries and activations.
  above the loaded model   CPU: peak RSS minus the RSS when the peak was reset, i.e. the generation's own
                working memory without the weights and libraries that both implementations hold alike
  frames / s    frames / wall
  ratios        diffusers/t2vz for time (> 1: t2vz faster), t2vz/diffusers for memory (< 1: t2vz smaller)
  FLOPs         of one t2vz generation; achieved FLOP/s = FLOPs / wall for each row (the same video, so the same
                useful work), and on CUDA its fraction of the device's peak dense FLOP/s
                (t2vz.experiment.benchmark.PEAK_TFLOPS: H100 SXM/PCIe/NVL, H200; n/a elsewhere)
  parity        max |t2vz - diffusers| over the frames (in [0, 1]) of the first round, at the run's dtype
                (~1e-6 in fp32 on CPU)
  machine       CPU model, cores, memory, and the CPU features reduced precision depends on: the AMX, AVX-512
                BF16/FP16, AVX_NE_CONVERT, AVX-512 and AVX2 flags of /proc/cpuinfo, the ISA ATen dispatches to
                (ATEN_CPU_CAPABILITY caps it) and whether oneDNN runs bf16 / fp16 natively (ONEDNN_MAX_CPU_ISA
                caps it); torch, diffusers and Python versions

Fast modes (modes=[exact,m0.5,c3,m0.5_c3]): every mode is one more t2vz row, generated with its keywords
(exact: none; mR: merging_ratio=R, token merging; cN: cache_interval=N, feature caching, cNbB with
cache_branch=B; mR_cN: both), and for every ratio R that a mode merges at, one diffusers row with
tomesd.apply_patch(pipe, ratio=R) (tomesd=false leaves them out). Each row shows its time and peak memory as
ratios to diffusers (and to diffusers+tomesd at its ratio), and its frames' max and mean |Δ| from t2vz's exact
frames: what the mode gives up.

Presets (preset=NAME sets the keys below; any key can be overridden after it):
  small           model=tiny device=cpu dtype=fp32, 8 frames at 64x64, 10 steps, t0=4 t1=7
  sd15-small-res  model=sd15 device=cpu dtype=fp32, 8 frames at 64x64, 10 steps, t0=4 t1=7
  sd15-256        model=sd15 device=cpu dtype=fp32, 8 frames at 256x256, 10 steps, t0=4 t1=7, 2 rounds,
                  modes exact, m0.5, c3, m0.5_c3 (attention at 1024 tokens a frame: where merging acts)
  sd15-128-bf16   model=sd15 device=cpu dtype=bf16, 4 frames at 128x128, 10 steps, t0=4 t1=7, 2 rounds
  sd15-512        model=sd15 device=cuda dtype=fp16 vae_dtype=fp32, 8 frames at 512x512, 50 steps, t0=44 t1=47,
                  the four modes

Precision and kernels: `dtype` is the UNet's and text encoder's; `vae_dtype=auto|fp32|fp16|bf16` the VAE's for both
implementations (auto: each one's default, t2vz float32 under fp16 (t2vz.sd.loading.vae_dtype_for), diffusers the
pipeline's dtype; diffusers' latents are then cast to the VAE's dtype at decode). `sdpa=flash|efficient|math|cudnn`
forces that scaled_dot_product_attention backend inside the UNet's forward only (t2vz.experiment.benchmark
.ForcedSDPA): the text encoder's masked attention and the VAE's attention keep the default dispatch.

long_video=true adds a t2vz-only table: peak memory at num_frames, at long_frames (48) in chunks of chunk_size
(8), and at long_frames all at once, one fresh process each.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER_FLAG = "--worker"
IMPLEMENTATIONS = ("t2vz", "diffusers", "diffusers+tomesd")
MODELS = ("tiny", "sd15")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
VAE_DTYPE_NAMES = ("auto", *DTYPE_NAMES)
# = t2vz.experiment.benchmark.SDPA_BACKENDS (a test checks), repeated so that the config and --help need no torch
SDPA_BACKENDS = ("auto", "flash", "efficient", "math", "cudnn")
PRESETS = {
    "small": dict(model="tiny", device="cpu", dtype="fp32", num_frames=8, height=64, width=64,
                  num_inference_steps=10, t0=4, t1=7),
    "sd15-small-res": dict(model="sd15", device="cpu", dtype="fp32", num_frames=8, height=64, width=64,
                           num_inference_steps=10, t0=4, t1=7),
    "sd15-256": dict(model="sd15", device="cpu", dtype="fp32", num_frames=8, height=256, width=256,
                     num_inference_steps=10, t0=4, t1=7, modes=["exact", "m0.5", "c3", "m0.5_c3"], repeats=2),
    "sd15-128-bf16": dict(model="sd15", device="cpu", dtype="bf16", num_frames=4, height=128, width=128,
                          num_inference_steps=10, t0=4, t1=7, repeats=2),
    # vae_dtype=fp32 for both: t2vz's own fp16 default (vae_dtype_for: SD's decoder can overflow float16 into
    # black frames), given to diffusers too, so that both decode alike; diffusers alone would decode in fp16, and
    # the row would then compare t2vz's fp32 decoding with diffusers' fp16 one. vae_dtype=fp16 gives the other
    # like-for-like table (diffusers' default).
    "sd15-512": dict(model="sd15", device="cuda", dtype="fp16", vae_dtype="fp32", num_frames=8, height=512,
                     width=512, num_inference_steps=50, t0=44, t1=47, modes=["exact", "m0.5", "c3", "m0.5_c3"]),
}
FAST_MODE = re.compile(r"^(?:m(?P<ratio>0?\.\d+|0))?_?(?:c(?P<interval>\d+)(?:b(?P<branch>\d+))?)?$")
SETTING_KEYS = ("prompt", "seed", "num_frames", "height", "width", "num_inference_steps", "guidance_scale",
                "motion_strength", "t0", "t1")


@dataclass
class BenchmarkConfig:
    """`python experiments/benchmark.py`: t2vz vs diffusers' TextToVideoZeroPipeline, one table."""

    defaults: list[Any] = field(default_factory=lambda: [
        "_self_", {"preset": "small"}, {"hydra/job": "benchmark"}, {"override hydra/help": "benchmark"}])
    model: str = "tiny"  # tiny | sd15: the random model's shapes (experiments/bench_reference.py MODEL_SHAPES)
    model_seed: int = 0  # seeds the random weights
    prompt: str = "a horse galloping on the street"
    seed: int = 0  # seeds the generation (a CPU torch.Generator, the same for both)
    num_frames: int = 8
    height: int = 64
    width: int = 64
    num_inference_steps: int = 10
    guidance_scale: float = 7.5
    motion_strength: float = 12.0  # λ along δ = (1, 1); diffusers' motion_field_strength_x = _y
    t0: int = 4
    t1: int = 7
    device: str = "cpu"  # auto | cpu | cuda | cuda:N
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    vae_dtype: str = "auto"  # auto (each implementation's default) | fp32 | fp16 | bf16: the VAE's, for both
    repeats: int = 3  # rounds; each round runs every implementation once, alternating the order
    # DDIM steps of the warm-up generation in every subprocess (0: no warm-up); raised to 4 with feature caching,
    # and the timed run's own settings with compile=true (warmup_settings)
    warmup_steps: int = 2
    threads: Optional[int] = None  # torch threads (and OMP_NUM_THREADS) of the subprocesses; None: inherited
    flops: bool = True  # count the FLOPs of one t2vz generation (an extra, untimed subprocess)
    compile: bool = False  # torch.compile both implementations' UNets (the warm-up pays the compile time)
    sdpa: str = "auto"  # SDPA backend in both UNets: auto (PyTorch picks) | flash | efficient | math | cudnn
    long_video: bool = False  # also measure t2vz's peak memory at long_frames frames, chunked and not
    long_frames: int = 48
    chunk_size: int = 8  # frames per chunk of the long video (frame 1 plus chunk_size - 1 new frames)
    workdir: str = "runs/benchmark"  # where the model folders are built and cached
    # t2vz's settings, each a row: exact (no fast mode), mR (token merging ratio R), cN (feature caching every N
    # steps; cNbB: branch B), joined by _ (m0.5_c3); parse_mode
    modes: list[str] = field(default_factory=lambda: ["exact"])
    tomesd: bool = True  # also diffusers with tomesd.apply_patch(pipe, ratio=R) for every R the modes merge at

    def __post_init__(self):
        def check_int(key: str, low: int) -> None:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key}={value!r} must be an integer >= {low}")

        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r} is not one of {', '.join(MODELS)}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        if self.vae_dtype not in VAE_DTYPE_NAMES:
            raise ValueError(f"vae_dtype={self.vae_dtype!r} is not one of {', '.join(VAE_DTYPE_NAMES)} (auto: each "
                             "implementation's default)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r} is not one of auto, cpu, cuda, cuda:N")
        for key, low in (("num_frames", 2), ("height", 8), ("width", 8), ("num_inference_steps", 1),
                         ("repeats", 1), ("warmup_steps", 0), ("t0", 0), ("t1", 0), ("long_frames", 2),
                         ("chunk_size", 2)):
            check_int(key, low)
        if self.threads is not None:
            check_int("threads", 1)
        if self.sdpa not in SDPA_BACKENDS:
            raise ValueError(f"sdpa={self.sdpa!r} is not one of {', '.join(SDPA_BACKENDS)}")
        for mode in self.modes:
            parse_mode(mode)
        if "exact" not in self.modes:
            raise ValueError(f"modes={list(self.modes)} must include exact: every fast mode is measured against it")
        if not self.t0 <= self.t1 <= self.num_inference_steps - 1:
            raise ValueError(f"t0={self.t0}, t1={self.t1} must satisfy 0 <= t0 <= t1 <= num_inference_steps - 1 = "
                             f"{self.num_inference_steps - 1} (they count DDIM steps from the end)")

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SETTING_KEYS}

    def variants(self) -> list[tuple[str, str]]:
        """(implementation, mode) of every row: t2vz in each mode, diffusers, and diffusers + tomesd at each
        merging ratio of the modes."""
        rows = [("t2vz", mode) for mode in dict.fromkeys(["exact", *self.modes])] + [("diffusers", "exact")]
        twins = dict.fromkeys(t for t in map(tomesd_twin, sorted(self.modes, key=merging_ratio)) if t)
        return rows + ([("diffusers+tomesd", mode) for mode in twins] if self.tomesd else [])


def merging_ratio(mode: str) -> float:
    return parse_mode(mode).get("merging_ratio", 0.0)


def tomesd_twin(mode: str) -> str | None:
    """The mode of the diffusers + tomesd row at `mode`'s merging ratio ("m0.5" for "m0.5_c3"); None without
    merging."""
    return f"m{merging_ratio(mode):g}" if merging_ratio(mode) else None


def parse_mode(mode: str) -> dict[str, Any]:
    """A mode's name → t2vz's keywords: "exact" → {}, "m0.5" → merging_ratio 0.5, "c3" → cache_interval 3,
    "c3b1" → also cache_branch 1, "m0.5_c3" → both. ValueError naming the mode otherwise."""
    match = FAST_MODE.match(mode) if mode != "exact" else None
    if mode != "exact" and (match is None or not any(match.groupdict().values())):
        raise ValueError(f"mode {mode!r} is not exact, mR (token merging ratio R in [0, 1)), cN (feature caching every "
                         "N steps), cNbB (and branch B), or mR_cN")
    if match is None:
        return {}
    keys = {"ratio": ("merging_ratio", float), "interval": ("cache_interval", int), "branch": ("cache_branch", int)}
    return {keys[k][0]: keys[k][1](v) for k, v in match.groupdict().items() if v is not None}


def help_template() -> str:
    return (__doc__ + "\n== Config groups ==\n$APP_CONFIG_GROUPS\n== Config, with the overrides given ==\n$CONFIG\n"
            "Powered by Hydra; --hydra-help shows Hydra's own options.\n")


def register() -> ConfigStore:
    cs = ConfigStore.instance()
    cs.store(name="benchmark", node=BenchmarkConfig)
    for name, values in PRESETS.items():
        cs.store(group="preset", name=name, node=values, package="_global_")
    cs.store(group="hydra/help", name="benchmark", node={"app_name": "benchmark", "header": "", "footer": "",
                                                          "template": help_template()})
    cs.store(group="hydra/job", name="benchmark", package="hydra.job", node={"name": "benchmark"})
    return cs


register()


# ------------------------------------------------------------------------------------------------ the worker
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    """A name of DTYPE_NAMES ("fp32", "fp16", "bf16") → the torch dtype."""
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def dtype_name(dtype) -> str:
    """A torch dtype → "fp32" | "fp16" | "bf16" (its str for anything else)."""
    return {v: k for k, v in TORCH_DTYPES.items()}.get(str(dtype).removeprefix("torch."), str(dtype))


class Runner(NamedTuple):
    """A loaded implementation: `unet`, the uncompiled UNet module (for hooks); `generate(settings)` → frames
    (F, H, W, 3) float32 on the CPU; `vae_dtype`, the dtype its VAE decodes in ("fp32", ...)."""
    unet: Any
    generate: Any
    vae_dtype: str


def load_runner(impl: str, folder: str, device, dtype, compile_unet: bool = False, mode: str = "exact",
                sdpa: str = "auto", vae_dtype=None) -> Runner:
    """`impl` loaded from `folder` in `mode` (`parse_mode`), its UNet and text encoder in `dtype`, its VAE in
    `vae_dtype` (None: the implementation's default). With compile_unet the pipeline's UNet is torch.compile'd
    (`Runner.unet` stays the uncompiled one, for hooks); with `sdpa` other than "auto" that backend is forced
    around the UNet's forward only (`ForcedSDPA`, installed on the module the pipeline calls, compiled or not).
    diffusers+tomesd: diffusers' pipeline with tomesd.apply_patch at the mode's ratio; its random stream is forked
    from torch's global one at the first UNet call, which every generation reseeds with its seed, as t2vz forks
    its own from the generation's generator."""
    import torch

    from t2vz.experiment.benchmark import ForcedSDPA

    fast = parse_mode(mode)

    if impl == "t2vz":
        from t2vz import TextToVideoZero, load

        # TextToVideoZero.from_pretrained(folder, device, dtype) is this with vae_dtype=None; it does not take
        # vae_dtype itself, t2vz.load does
        pipe = TextToVideoZero(load(folder, device=device, dtype=dtype, vae_dtype=vae_dtype))
        unet = pipe.sd.unet
        if compile_unet:
            pipe.sd.unet = torch.compile(unet)
        if sdpa != "auto":
            ForcedSDPA(pipe.sd.unet, sdpa)

        def generate(s: dict) -> torch.Tensor:
            return pipe(s["prompt"], num_frames=s["num_frames"], height=s["height"], width=s["width"],
                        num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
                        motion_strength=s["motion_strength"], direction=(1.0, 1.0), t0=s["t0"], t1=s["t1"],
                        ddpm_marginal="reference", generator=torch.Generator().manual_seed(s["seed"]),
                        chunk_size=s.get("chunk_size"), progress=False, **fast).float()

        return Runner(unet, generate, dtype_name(next(pipe.sd.vae.parameters()).dtype))
    if impl in ("diffusers", "diffusers+tomesd"):
        import bench_reference

        pipe = bench_reference.load_pipeline(folder, device, dtype, vae_dtype)
        unet = pipe.unet
        if impl == "diffusers+tomesd":
            import tomesd

            tomesd.apply_patch(pipe, ratio=fast["merging_ratio"])
        if compile_unet:
            pipe.unet = torch.compile(unet)
        if sdpa != "auto":
            ForcedSDPA(pipe.unet, sdpa)

        def generate(s: dict) -> torch.Tensor:
            if impl == "diffusers+tomesd":
                unet._tome_info["args"]["generator"] = None  # forked anew at the first UNet call, from:
                torch.manual_seed(s["seed"])
            return bench_reference.generate(pipe, **s)

        return Runner(unet, generate, dtype_name(pipe.vae.dtype))
    raise ValueError(f"implementation {impl!r} is not one of {IMPLEMENTATIONS}")


# With feature caching the eager warm-up has at least this many DDIM steps: at t0 = 0, t1 = 1 frame 1's T → T1
# loop then has steps − 2 >= 2 UNet calls and the all-frames loop 2, so that each runs a full and a cached pass.
CACHED_WARMUP_STEPS = 4


def warmup_settings(settings: dict, steps: int, cache_interval: int = 1, compile: bool = False) -> dict | None:
    """The warm-up generation before the timed one, or None for no warm-up (steps = 0). It must take every path
    through the UNet that the timed run takes, or the first use of a path (new kernels, a new shape, and above
    all a compilation) lands in the timed run:

    - compile: the timed run's own settings. A compiled UNet is specialised on the batch size (2 rows for frame
      1 alone, 2·frames for the video), on full vs cached passes (feature caching), and on values that become
      dynamic only after a first recompile (a cache's call count, the batch size); a shorter run may meet only
      some of those graphs, and only a run of the same length is sure to meet all of them. It costs one more
      untimed generation.
    - eager: `steps` DDIM steps with t0 = 0, t1 = min(1, steps − 1), the same prompt, frames and size. Text2Video-
      Zero runs three denoising loops (frame 1 T → T1, frame 1 T1 → T0, all frames T1 → 0), and feature caching
      starts each on a full pass; with cache_interval > 1 the steps are raised to CACHED_WARMUP_STEPS so that
      a loop at each batch size (frame 1's T → T1 and the all-frames one) runs a full pass and then a cached one.
      Eager kernels depend on shapes and on which layers run, not on the call count, so one cached pass each is
      every path."""
    if steps == 0:
        return None
    if compile:
        return dict(settings)
    if cache_interval > 1:
        steps = max(steps, CACHED_WARMUP_STEPS)
    return {**settings, "num_inference_steps": steps, "t0": 0, "t1": min(1, steps - 1)}


def worker(spec: dict) -> dict:
    """One measured run in this (fresh) process; see the module docstring. Returns the result record."""
    import warnings

    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    import torch

    from t2vz.experiment import benchmark as bench

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["impl"].startswith("diffusers"):
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    device = torch.device(spec["device"])
    dtype = torch_dtype(spec["dtype"])
    vae_dtype = None if spec.get("vae_dtype", "auto") == "auto" else torch_dtype(spec["vae_dtype"])
    import_s = time.perf_counter() - start

    start = time.perf_counter()
    unet, generate, vae_dtype_used = load_runner(spec["impl"], spec["folder"], device, dtype,
                                                 spec.get("compile", False), spec.get("fast", "exact"),
                                                 spec.get("sdpa", "auto"), vae_dtype)
    bench.synchronize(device)
    load_s = time.perf_counter() - start
    settings = spec["settings"]
    record = {"impl": spec["impl"], "mode": spec["mode"], "fast": spec.get("fast", "exact"), "import_s": import_s,
              "load_s": load_s, "vae_dtype": vae_dtype_used,
              "machine": bench.machine_info(device)}
    if spec["impl"].startswith("diffusers"):
        record["diffusers"] = diffusers.__version__

    if spec["mode"] == "flops":
        with bench.CallCounter(unet) as calls:
            frames, flops = bench.count_flops(lambda: generate(settings))
        from t2vz.experiment.roofline import matmul_peak_flops
        from t2vz.sd.onednn import onednn_supports

        # bf16 only where it has fast kernels: on a CPU whose oneDNN has none, PyTorch's reference bf16 matmul
        # takes minutes at 2048³ (and would say nothing about the machine's peak)
        peak_dtypes = [("fp32", torch.float32)]
        if torch.device(device).type != "cpu" or onednn_supports(torch.bfloat16):
            peak_dtypes.append(("bf16", torch.bfloat16))
        peaks = {name: matmul_peak_flops(dt, device=device, sync=lambda: bench.synchronize(device)) / 1e9
                 for name, dt in peak_dtypes}
        record.update(flops=flops, unet_calls=calls.calls, unet_rows=calls.rows, matmul_peak_gflops=peaks)
        return record

    warmup_s = 0.0
    warmup = warmup_settings(settings, spec["warmup_steps"],
                             parse_mode(spec.get("fast", "exact")).get("cache_interval", 1), spec.get("compile", False))
    if warmup is not None:
        start = time.perf_counter()
        generate(warmup)
        bench.synchronize(device)
        warmup_s = time.perf_counter() - start
    rss_reset = bench.reset_peak_memory(device)
    rss_at_reset = bench.current_rss_mib()
    with bench.CallCounter(unet) as calls:
        bench.synchronize(device)
        start = time.perf_counter()
        frames = generate(settings)
        bench.synchronize(device)
        wall_s = time.perf_counter() - start
    record.update(
        warmup_s=warmup_s, warmup_steps=warmup["num_inference_steps"] if warmup else 0, wall_s=wall_s,
        unet_calls=calls.calls, unet_rows=calls.rows,
        peak_memory_mib=bench.peak_memory_mib(device), peak_rss_mib=bench.peak_rss_mib(), rss_peak_reset=rss_reset,
        rss_at_reset_mib=rss_at_reset,
        memory_kind="cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
        frames_shape=list(frames.shape),
        diffusers_loaded=any(m == "diffusers" or m.startswith("diffusers.") for m in sys.modules),
    )
    if spec.get("frames_path"):
        import numpy as np

        np.save(spec["frames_path"], frames.numpy().astype(np.float32))
    return record


def worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    record = worker(spec)
    Path(spec["result_path"]).write_text(json.dumps(record, indent=2) + "\n")
    return 0


# ------------------------------------------------------------------------------------------ the orchestrator
def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device=cpu or device=auto")
    return resolved


def prepare_models(workdir: str | os.PathLike, model: str, model_seed: int, log=print) -> tuple[Path, Path]:
    """(diffusers folder, t2vz folder) of the random `model`: built and converted once, cached under workdir."""
    import bench_reference

    from weights_convert.convert import convert

    root = Path(workdir) / f"{model}-seed{model_seed}"
    ref, ours = root / "diffusers", root / "t2vz"
    root.mkdir(parents=True, exist_ok=True)
    rebuilt = False
    if not bench_reference.is_diffusers_folder(ref):
        log(f"building the random {model} model (seed {model_seed}) as a diffusers folder: {ref}")
        bench_reference.build_diffusers_folder(ref, model, model_seed)
        rebuilt = True
    if rebuilt or not (ours / "t2vz_model.json").is_file():
        log(f"converting it with weights_convert: {ours}")
        convert(ref, ours, overwrite=True)
    return ref, ours


def spawn(spec: dict, log_path: Path, threads: Optional[int]) -> dict:
    """Run `worker(spec)` in a fresh Python process; its record, or RuntimeError with the end of its log."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, json.dumps(spec)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_path.write_text(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"the {spec['impl']} {spec['mode']} run failed (exit {proc.returncode}); "
                           f"log {log_path}:\n{tail}")
    return json.loads(Path(spec["result_path"]).read_text())


def run_benchmark(config: BenchmarkConfig, out_dir: str | os.PathLike, preset: str | None = None,
                  log=print) -> dict:
    """Every run of the benchmark → the summary (rows, parity, FLOPs, machine, runs); writes nothing but the
    workers' files under out_dir/runs/ (`write_results` writes the tables)."""
    import numpy as np

    from t2vz.experiment.benchmark import denoising_steps

    out_dir = Path(out_dir)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    ref, ours = prepare_models(config.workdir, config.model, config.model_seed, log)
    folders = {"t2vz": ours, "diffusers": ref, "diffusers+tomesd": ref}
    settings = config.settings()
    variants = config.variants()

    def spec(impl: str, mode: str, tag: str, frames: bool = False, fast: str = "exact") -> dict:
        return {"impl": impl, "mode": mode, "fast": fast, "folder": str(folders[impl].resolve()),
                "device": str(device),
                "dtype": config.dtype, "vae_dtype": config.vae_dtype, "settings": settings,
                "warmup_steps": config.warmup_steps,
                "threads": config.threads, "compile": config.compile, "sdpa": config.sdpa,
                "result_path": str((runs_dir / f"{tag}.json").resolve()),
                "frames_path": str((runs_dir / f"frames_{variant_name(impl, fast)}.npy").resolve()) if frames else None}

    runs: list[dict] = []
    total = config.repeats * len(variants)
    for r in range(config.repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for impl, fast in order:
            name = variant_name(impl, fast)
            tag = f"{len(runs) + 1:02d}_{name}"
            record = spawn(spec(impl, "time", tag, frames=r == 0, fast=fast), runs_dir / f"{tag}.log", config.threads)
            record["round"] = r + 1
            runs.append(record)
            log(f"[{len(runs)}/{total}] {name:22s} wall {record['wall_s']:.3f} s, load {record['load_s']:.2f} s, "
                f"peak {record['peak_memory_mib']:.0f} MiB, {record['unet_calls']} UNet calls")
    flops, matmul_peaks = None, None
    if config.flops:
        record = spawn(spec("t2vz", "flops", "flops_t2vz"), runs_dir / "flops_t2vz.log", config.threads)
        flops, matmul_peaks = record["flops"], record["matmul_peak_gflops"]
        log(f"FLOPs of one t2vz generation: {flops / 1e9:.3f} GFLOP")
    long_video = []
    if config.long_video:
        for frames, chunk in ((config.num_frames, None), (config.long_frames, config.chunk_size),
                              (config.long_frames, None)):
            tag = f"long_{frames}f_chunk{chunk or 'none'}"
            record = spawn({**spec("t2vz", "time", tag), "settings": {**settings, "num_frames": frames,
                                                                      "chunk_size": chunk}},
                           runs_dir / f"{tag}.log", config.threads)
            record.update(num_frames=frames, chunk_size=chunk)
            long_video.append(record)
            log(f"t2vz, {frames} frames, chunk_size {chunk}: wall {record['wall_s']:.3f} s, "
                f"peak {record['peak_memory_mib']:.0f} MiB")
    frames = {name: np.load(runs_dir / f"frames_{name}.npy") for name in (variant_name(*v) for v in variants)}
    exact = frames["t2vz"]

    def max_diff(a, b) -> float:
        return float(np.abs(a - b).max()) if a.shape == b.shape else float("nan")
    parity = max_diff(exact, frames["diffusers"])
    deviation = {name: {"max": max_diff(f, exact), "mean": float(np.abs(f - exact).mean())}
                 for name, f in frames.items()}
    for impl, fast in variants:  # t2vz against diffusers + tomesd at the same ratio: the same merging
        twin = variant_name("diffusers+tomesd", fast)
        if impl == "t2vz" and twin in frames:
            deviation[variant_name(impl, fast)]["max_vs_tomesd"] = max_diff(frames[variant_name(impl, fast)],
                                                                            frames[twin])
    steps = denoising_steps(config.num_inference_steps, config.t0, config.t1)
    machine = dict(runs[0]["machine"])
    machine["diffusers"] = next(r["diffusers"] for r in runs if r["impl"].startswith("diffusers"))
    summary = {"preset": preset, "config": {k: v for k, v in asdict(config).items() if k != "defaults"},
               "device": str(device), "machine": machine, "steps": steps, "flops": flops,
               "parity_max_abs_diff": parity, "deviation": deviation, "matmul_peak_gflops": matmul_peaks,
               "variants": variants, "runs": runs,
               "long_video": long_video}
    summary["rows"] = summarize(summary)
    return summary


def variant_name(impl: str, mode: str) -> str:
    """A row's name: the implementation, and its mode unless exact ("t2vz", "t2vz m0.5_c3", "diffusers+tomesd m0.5")."""
    return impl if mode == "exact" else f"{impl} {mode}"


def summarize(summary: dict) -> list[dict]:
    """One CSV row per variant (implementation and mode) from the runs."""
    from t2vz.experiment.benchmark import peak_flops

    cfg, machine, flops = summary["config"], summary["machine"], summary["flops"]
    cuda = summary["device"].startswith("cuda")
    peak = peak_flops(machine["device_name"], cfg["dtype"]) if cuda else None
    rows = []
    for impl, mode in summary["variants"]:
        name = variant_name(impl, mode)
        runs = [r for r in summary["runs"] if r["impl"] == impl and r.get("fast", "exact") == mode]
        walls = [r["wall_s"] for r in runs]
        wall = statistics.median(walls)
        calls = runs[0]["unet_calls"]
        achieved = flops / wall if (flops and mode == "exact") else None  # the exact path's FLOPs
        working = [working_mib(r) for r in runs]
        deviation = summary.get("deviation", {}).get(name, {})
        rows.append({
            "preset": summary["preset"] or "", "implementation": impl, "mode": mode, "variant": name,
            "model": cfg["model"], "device": summary["device"], "device_name": machine["device_name"],
            "dtype": cfg["dtype"], "num_frames": cfg["num_frames"], "height": cfg["height"], "width": cfg["width"],
            "num_inference_steps": cfg["num_inference_steps"], "t0": cfg["t0"], "t1": cfg["t1"],
            "guidance_scale": cfg["guidance_scale"], "repeats": len(runs),
            "median_wall_s": wall, "min_wall_s": min(walls), "max_wall_s": max(walls),
            "unet_calls": calls, "unet_rows": runs[0]["unet_rows"], "s_per_step": wall / calls if calls else None,
            "peak_memory_mib": statistics.median(r["peak_memory_mib"] for r in runs),
            "memory_kind": runs[0]["memory_kind"], "frames_per_s": cfg["num_frames"] / wall,
            "working_memory_mib": statistics.median(working) if None not in working else None,
            "median_load_s": statistics.median(r["load_s"] for r in runs),
            "flops": flops, "achieved_tflops": achieved / 1e12 if achieved else None,
            "peak_tflops": peak / 1e12 if peak else None,
            "peak_fraction": achieved / peak if (achieved and peak) else None,
            "parity_max_abs_diff": summary["parity_max_abs_diff"],
            "deviation_max": deviation.get("max"), "deviation_mean": deviation.get("mean"),
            "max_diff_vs_tomesd": deviation.get("max_vs_tomesd"),
            "vae_dtype": runs[0].get("vae_dtype"),
            "torch": machine["torch"], "diffusers": machine["diffusers"], "cpu": machine["cpu"],
            "cpu_cores": machine["cpu_cores"], "cpu_flags": machine.get("cpu_flags_line"),
            "torch_threads": machine["torch_threads"],
        })
    by = {r["variant"]: r for r in rows}
    for r in rows:
        r["time_ratio_diffusers_over_t2vz"] = by["diffusers"]["median_wall_s"] / r["median_wall_s"]
        r["memory_ratio_t2vz_over_diffusers"] = r["peak_memory_mib"] / by["diffusers"]["peak_memory_mib"]
        twin = by.get(variant_name("diffusers+tomesd", tomesd_twin(r["mode"]))) if tomesd_twin(r["mode"]) else None
        r["time_ratio_tomesd_over_t2vz"] = twin["median_wall_s"] / r["median_wall_s"] if twin else None
    return rows


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    cfg, machine, steps, rows = summary["config"], summary["machine"], summary["steps"], summary["rows"]
    header = ["implementation", "median wall (s)", "min–max (s)", "UNet calls", "s / step", "peak memory (MiB)",
              "above the loaded model (MiB)", "frames / s", "load (s)", "time diffusers / row",
              "time diffusers+tomesd / row", "memory row / diffusers", "max |Δ| vs t2vz exact", "mean |Δ|",
              "TFLOP/s", "% of peak FLOP/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        reference = r["variant"] == "diffusers"
        cells = [r["variant"], f"{r['median_wall_s']:.3f}", f"{r['min_wall_s']:.3f}–{r['max_wall_s']:.3f}",
                 str(r["unet_calls"]), fmt(r["s_per_step"], ".4f"), f"{r['peak_memory_mib']:.0f}",
                 fmt(r["working_memory_mib"], ".0f"),
                 f"{r['frames_per_s']:.2f}", f"{r['median_load_s']:.2f}",
                 "—" if reference else f"{r['time_ratio_diffusers_over_t2vz']:.2f}",
                 fmt(r["time_ratio_tomesd_over_t2vz"], ".2f", "—"),
                 "—" if reference else f"{r['memory_ratio_t2vz_over_diffusers']:.2f}",
                 fmt(r["deviation_max"], ".3g", "—"), fmt(r["deviation_mean"], ".3g", "—"),
                 fmt(r["achieved_tflops"], ".3g"),
                 fmt(None if r["peak_fraction"] is None else 100 * r["peak_fraction"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    flops, rounds = summary["flops"], rows[0]["repeats"]
    on_cuda = summary["device"].startswith("cuda")
    peak = (f"% of peak: vs {fmt(rows[0]['peak_tflops'], '.1f')} TFLOP/s dense {cfg['dtype']} of "
            f"{machine['device_name']}" if on_cuda else "% of peak: CUDA only")
    notes = [
        f"- preset `{summary['preset']}`: random `{cfg['model']}` model (seed {cfg['model_seed']}), {cfg['dtype']} on "
        f"{summary['device']}; prompt \"{cfg['prompt']}\", seed {cfg['seed']}, {cfg['num_frames']} frames "
        f"{cfg['height']}x{cfg['width']}, {cfg['num_inference_steps']} DDIM steps, guidance {cfg['guidance_scale']}, "
        f"λ = {cfg['motion_strength']}, t0 = {cfg['t0']}, t1 = {cfg['t1']}; UNets "
        f"{'torch.compile' if cfg.get('compile') else 'eager'}, SDPA backend {cfg.get('sdpa', 'auto')}"
        f"{' (forced in the UNets only)' if cfg.get('sdpa', 'auto') != 'auto' else ''}; {vae_note(cfg, rows)}",
        f"- {rounds} round{'s' if rounds != 1 else ''}, alternating which implementation runs first; each run a "
        f"fresh process: load, {warmup_note(cfg, rows)}, then the timed generation (wall: "
        f"median over the rounds, load excluded)",
        f"- UNet calls (counted; one per DDIM step, cond + uncond batched): {steps['first_frame']} on frame 1 "
        f"(T → T0) + {steps['all_frames']} on all frames (T1 → 0) = {steps['total']}; s / step = wall / UNet calls",
        f"- peak memory: {rows[0]['memory_kind']} of the timed run (reset after the warm-up), median over the rounds;"
        " above the loaded model: that peak minus the RSS at the reset (weights, libraries and what the warm-up left)",
        f"- parity: max |t2vz − diffusers| = {summary['parity_max_abs_diff']:.3g} over the frames in [0, 1] "
        f"({cfg['dtype']}; t2vz with ddpm_marginal=\"reference\"); |Δ| vs t2vz exact: each row's frames against "
        "t2vz's exact ones, the quality a fast mode gives up on these random weights",
        *tomesd_parity_notes(rows),
        *roofline_notes(summary, rows),
        "- FLOPs of one t2vz generation (FlopCounterMode: matmuls, convolutions, attention): "
        + ("not counted" if flops is None else f"{flops / 1e9:.3f} GFLOP; TFLOP/s = these FLOPs / the row's median "
           f"wall; {peak}"),
        f"- machine: {machine['device_name'] if on_cuda else 'CPU only'}; {machine['cpu']}, {machine['cpu_cores']} "
        f"cores ({machine['cpu_cores_usable']} usable), {machine['memory_gib']} GiB; torch {machine['torch']} "
        f"({machine['torch_threads']} threads), diffusers {machine['diffusers']}, Python {machine['python']}, "
        f"{machine['platform']}",
        f"- {machine.get('cpu_flags_line', 'CPU flags: not recorded')}",
    ]
    title = "# t2vz vs diffusers TextToVideoZeroPipeline"
    return "\n".join([title, "", *lines, "", *notes, "", *long_video_table(summary)])


def vae_note(cfg: dict, rows: list[dict]) -> str:
    """The VAE's dtype as asked (`vae_dtype`) and as each implementation ran it: "VAE fp32" when all agree,
    else "VAE auto: t2vz fp32, diffusers fp16"."""
    used = {r["implementation"]: r.get("vae_dtype") for r in rows}
    asked = cfg.get("vae_dtype", "auto")
    if len(set(used.values())) == 1:
        return f"VAE {next(iter(used.values()))}" + (" (auto)" if asked == "auto" else "")
    return f"VAE {asked}: " + ", ".join(f"{impl} {dtype}" for impl, dtype in used.items())


def warmup_note(cfg: dict, rows: list[dict]) -> str:
    """How the runs warmed up (warmup_settings): "a 2-step warm-up generation (4 with feature caching: ...)" where
    a mode caches, or the timed run's settings when compiling."""
    if cfg["warmup_steps"] == 0:
        return "no warm-up"
    if cfg.get("compile"):
        return "a warm-up generation with the timed run's settings (compiled UNets: every graph compiled there)"
    cached = any(parse_mode(r["mode"]).get("cache_interval", 1) > 1 for r in rows)
    extra = (f" ({max(cfg['warmup_steps'], CACHED_WARMUP_STEPS)} with feature caching: a full and a cached pass at "
             "each batch size)") if cached and cfg["warmup_steps"] < CACHED_WARMUP_STEPS else ""
    return f"a {cfg['warmup_steps']}-step warm-up generation{extra}"


def tomesd_parity_notes(rows: list[dict]) -> list[str]:
    """Markdown notes: t2vz's merged frames against diffusers + tomesd's at the same ratio."""
    return [f"- {r['variant']} against diffusers+tomesd at the same ratio: max |Δ| = {r['max_diff_vs_tomesd']:.3g}"
            for r in rows if r.get("max_diff_vs_tomesd") is not None]


def roofline_notes(summary: dict, rows: list[dict]) -> list[str]:
    """Markdown notes: the exact rows' achieved GFLOP/s against the machine's measured matmul peaks."""
    peaks = summary.get("matmul_peak_gflops") or {}
    if not peaks or not summary["flops"]:
        return []
    achieved = ", ".join(f"{r['variant']} {r['achieved_tflops'] * 1e3:.0f} GFLOP/s"
                         for r in rows if r["achieved_tflops"])
    measured = ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
    if "bf16" not in peaks:
        measured += " (bf16 not measured: this CPU's oneDNN has no bf16 kernels)"
    return [f"- roofline: achieved (the exact path's FLOPs / wall, text encoder and VAE included) {achieved}; "
            f"this machine's 2048³ matmul: {measured} GFLOP/s (experiments/roofline.py times the UNet's own kernels)"]


def working_mib(record: dict) -> float | None:
    """Peak memory above what the process held when the peak was reset (weights, libraries, caches)."""
    at_reset = record.get("rss_at_reset_mib")
    if at_reset is None or record["memory_kind"] != "peak RSS":
        return None
    return record["peak_memory_mib"] - at_reset


def long_video_table(summary: dict) -> list[str]:
    """Markdown lines: t2vz's peak memory for the short video, the long one chunked and the long one unchunked."""
    records = summary.get("long_video") or []
    if not records:
        return []
    base = records[0]
    lines = ["## t2vz: peak memory as the video grows", "",
             "| frames | chunk_size | wall (s) | peak memory (MiB) | vs first row | above the loaded model (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in records:
        cells = [str(r["num_frames"]), str(r["chunk_size"] or "none (all at once)"), f"{r['wall_s']:.3f}",
                 f"{r['peak_memory_mib']:.0f}", f"{r['peak_memory_mib'] / base['peak_memory_mib']:.3f}",
                 fmt(working_mib(r), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "- one fresh process per row (load, warm-up at the row's own length, reset, timed run); "
              "\"above the loaded model\" = peak RSS − RSS at the reset", ""]
    return lines


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(summary: dict, out_dir: str | os.PathLike) -> str:
    """benchmark.md, benchmark.csv and benchmark.json into out_dir, each atomically; returns the Markdown."""
    from t2vz.video_io import write_text

    out_dir = Path(out_dir)
    text = markdown(summary)
    write_text(out_dir / "benchmark.md", text)
    write_text(out_dir / "benchmark.csv", to_csv(summary["rows"]))
    write_text(out_dir / "benchmark.json", json.dumps(summary, indent=2) + "\n")
    return text


@hydra.main(version_base="1.3", config_path=None, config_name="benchmark")
def main(cfg) -> None:
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        config = OmegaConf.to_object(cfg)  # a BenchmarkConfig; __post_init__ checks the values
        summary = run_benchmark(config, out_dir, HydraConfig.get().runtime.choices.get("preset"))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(write_results(summary, out_dir))
    print(f"wrote benchmark.md, benchmark.csv and benchmark.json to {out_dir}")


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER_FLAG]:
        sys.exit(worker_main(sys.argv[2:]))
    main()

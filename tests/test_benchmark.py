"""experiments/benchmark.py: the presets compose, and the small preset (1 round, 2 frames, 3 steps) runs end to end
and writes both tables with both implementations, equal frames, positive times, memory and FLOPs. No timing is
asserted: only that the numbers exist and are sane. Also: the machine line's CPU features (and the ISA caps that
change them), the warm-up rule (every UNet path of the timed run is taken in the warm-up), the VAE dtype option,
the SDPA backend forced in the UNet only, and experiments/gpu_check.sh's exit on a machine without a GPU."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from omegaconf import OmegaConf

from t2vz.experiment import benchmark as bench
from t2vz.experiment.benchmark import PEAK_TFLOPS, denoising_steps, peak_flops

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark_module():
    spec = importlib.util.spec_from_file_location("experiments_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # registers the config in Hydra's ConfigStore
    return module


@pytest.mark.parametrize("preset", ["small", "sd15-small-res", "sd15-256", "sd15-128-bf16", "sd15-512"])
def test_presets_compose(benchmark_module, preset):
    with initialize(version_base="1.3", config_path=None):
        cfg = compose("benchmark", overrides=[f"preset={preset}", "repeats=2"])
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, benchmark_module.BenchmarkConfig)
    for key, value in benchmark_module.PRESETS[preset].items():
        assert getattr(config, key) == value
    assert config.repeats == 2


def test_bad_values_are_refused(benchmark_module):
    with initialize(version_base="1.3", config_path=None):
        for overrides, match in ((["dtype=fp64"], "dtype"), (["t0=5", "t1=3"], "t0=5"), (["model=sdxl"], "model"),
                                 (["sdpa=fast"], "sdpa"), (["vae_dtype=fp64"], "vae_dtype='fp64' is not one of")):
            with pytest.raises(ValueError, match=match):
                OmegaConf.to_object(compose("benchmark", overrides=overrides))


def test_fast_mode_names(benchmark_module):
    parse = benchmark_module.parse_mode
    assert parse("exact") == {}
    assert parse("m0.5") == {"merging_ratio": 0.5}
    assert parse("c3") == {"cache_interval": 3}
    assert parse("c3b1") == {"cache_interval": 3, "cache_branch": 1}
    assert parse("m0.25_c2") == {"merging_ratio": 0.25, "cache_interval": 2}
    for bad in ("fast", "m", "c", "m1.5", "x0.5", ""):
        with pytest.raises(ValueError, match="is not exact, mR"):
            parse(bad)
    config = benchmark_module.BenchmarkConfig(modes=["exact", "m0.5", "c3", "m0.5_c3"])
    assert config.variants() == [("t2vz", "exact"), ("t2vz", "m0.5"), ("t2vz", "c3"), ("t2vz", "m0.5_c3"),
                                 ("diffusers", "exact"), ("diffusers+tomesd", "m0.5")]
    with pytest.raises(ValueError, match="must include exact"):
        benchmark_module.BenchmarkConfig(modes=["c3"])


def test_denoising_steps_and_peak_table():
    assert denoising_steps(50, 44, 47) == {"first_frame": 5, "all_frames": 48, "total": 53}
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == PEAK_TFLOPS["H100"]["bf16"] * 1e12
    assert peak_flops("NVIDIA H100 PCIe", "fp16") == PEAK_TFLOPS["H100 PCIe"]["fp16"] * 1e12
    assert peak_flops("NVIDIA H200", "fp32") == PEAK_TFLOPS["H200"]["fp32"] * 1e12
    assert peak_flops("AMD EPYC", "fp32") is None


def test_help_lists_presets_and_options():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("sd15-small-res", "sd15-512", "repeats", "warmup_steps", "UNet calls", "parity"):
        assert word in out.stdout


def test_small_preset_runs_end_to_end(tmp_path):
    out_dir = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "preset=small", "repeats=1", "num_frames=2", "num_inference_steps=3", "t0=0",
         "t1=1", "warmup_steps=1", "long_video=true", "long_frames=3", "chunk_size=2", f"workdir={tmp_path / 'work'}",
         "modes=[exact,m0.5,c2]",
         f"hydra.run.dir={out_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out_dir / "benchmark.md").is_file() and (out_dir / "benchmark.csv").is_file()
    markdown = (out_dir / "benchmark.md").read_text()
    assert "| t2vz |" in markdown and "| diffusers |" in markdown
    assert "| t2vz |" in proc.stdout  # the table is printed

    with open(out_dir / "benchmark.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"t2vz", "t2vz m0.5", "t2vz c2", "diffusers", "diffusers+tomesd m0.5"}
    assert "| t2vz m0.5 |" in markdown and "| diffusers+tomesd m0.5 |" in markdown
    # the modes give up something; merging equals diffusers + tomesd at the same ratio (fp32 noise)
    assert float(rows["t2vz"]["deviation_max"]) == 0.0 and float(rows["t2vz m0.5"]["deviation_max"]) > 0
    assert float(rows["t2vz c2"]["deviation_max"]) > 0
    assert float(rows["t2vz m0.5"]["max_diff_vs_tomesd"]) <= 1e-4
    assert float(rows["t2vz m0.5"]["time_ratio_tomesd_over_t2vz"]) > 0
    assert "roofline: achieved" in markdown and "matmul" in markdown
    steps = denoising_steps(3, 0, 1)["total"]
    for row in rows.values():
        assert float(row["parity_max_abs_diff"]) <= 1e-4  # ~1e-6: the same frames as diffusers
        assert float(row["median_wall_s"]) > 0 and float(row["s_per_step"]) > 0
        assert float(row["peak_memory_mib"]) > 0 and float(row["frames_per_s"]) > 0
        assert float(row["median_load_s"]) > 0
        assert int(row["unet_calls"]) == steps  # counted by a hook, as the formula says
        assert float(row["flops"]) > 0
        assert float(row["time_ratio_diffusers_over_t2vz"]) > 0 and float(row["memory_ratio_t2vz_over_diffusers"]) > 0
        assert row["peak_fraction"] == ""  # n/a on CPU
    assert rows["t2vz"]["unet_rows"] == rows["diffusers"]["unet_rows"]
    summary = json.loads((out_dir / "benchmark.json").read_text())
    assert {r["impl"]: r["diffusers_loaded"] for r in summary["runs"]} == {
        "t2vz": False, "diffusers": True, "diffusers+tomesd": True}
    for row in rows.values():
        assert float(row["working_memory_mib"]) >= 0  # peak minus the RSS at the reset
    # long_video: the short video, the long one in chunks, the long one at once; each its own measured run
    assert [(r["num_frames"], r["chunk_size"]) for r in summary["long_video"]] == [(2, None), (3, 2), (3, None)]
    assert all(r["peak_memory_mib"] > 0 and r["wall_s"] > 0 for r in summary["long_video"])
    assert "peak memory as the video grows" in markdown
    # the machine line states the CPU features reduced precision depends on, and what torch uses of them
    assert summary["machine"]["cpu_flags_line"] in markdown and "ATen ISA" in markdown
    assert summary["machine"]["cpu_features"]["aten_isa"] == torch.backends.cpu.get_cpu_capability()
    assert all(row["cpu_flags"] == summary["machine"]["cpu_flags_line"] for row in rows.values())
    # the VAE's dtype, as each implementation ran it (auto at fp32: fp32 for both)
    assert "VAE fp32 (auto)" in markdown and {row["vae_dtype"] for row in rows.values()} == {"fp32"}
    # the warm-up rule: warmup_steps=1, raised to 4 for the feature-caching row only
    assert {(r["impl"], r["fast"]): r["warmup_steps"] for r in summary["runs"]} == {
        ("t2vz", "exact"): 1, ("t2vz", "m0.5"): 1, ("t2vz", "c2"): 4, ("diffusers", "exact"): 1,
        ("diffusers+tomesd", "m0.5"): 1}
    assert "a 1-step warm-up generation (4 with feature caching" in markdown


# ----------------------------------------------------------------------------------------------- CPU features
def test_cpu_features_of_this_machine():
    features = bench.cpu_features()
    line = bench.cpu_features_line(features)
    assert line.startswith("CPU flags: ")
    assert features["aten_isa"] == torch.backends.cpu.get_cpu_capability()
    assert f"ATen ISA {features['aten_isa']};" in line
    assert features["onednn_bf16"] in (True, False) and features["onednn_fp16"] in (True, False)
    if os.path.exists("/proc/cpuinfo"):
        assert sorted(features["flags"] + features["missing"]) == sorted(bench.CPU_FLAGS)
    machine = bench.machine_info(torch.device("cpu"))
    assert machine["cpu_features"] == features and machine["cpu_flags_line"] == line


def test_cpu_features_from_cpuinfo_and_without_it(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16\n"
                       "\nprocessor\t: 1\nflags\t\t: fpu\n")
    features = bench.cpu_features(cpuinfo)
    assert features["flags"] == ["amx_bf16", "amx_tile", "avx512f", "avx2"]  # CPU_FLAGS' order, first processor's
    assert "avx512_bf16" in features["missing"] and "fpu" not in features["missing"]
    line = bench.cpu_features_line(features)
    assert line.startswith("CPU flags: amx_bf16 amx_tile avx512f avx2 (no amx_fp16, avx512_bf16, avx512_fp16, ")
    missing = bench.cpu_features(tmp_path / "absent")
    assert missing["flags"] is None and missing["missing"] is None
    assert bench.cpu_features_line(missing).startswith("CPU flags: unknown (no /proc/cpuinfo flags); ATen ISA ")


def test_cpu_features_say_unknown_without_the_private_probes(monkeypatch):
    """torch.ops.mkldnn._is_mkldnn_*_supported are private: missing (AttributeError) or failing (RuntimeError)
    they read "unknown", never an exception."""
    class Failing:
        def _is_mkldnn_bf16_supported(self):
            raise RuntimeError("no oneDNN in this build")

    monkeypatch.setattr(torch.ops, "mkldnn", Failing())
    features = bench.cpu_features()
    assert features["onednn_bf16"] is None and features["onednn_fp16"] is None
    assert "oneDNN bf16 unknown, fp16 unknown" in bench.cpu_features_line(features)


def test_cpu_features_honour_the_isa_caps():
    """ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA cap what torch uses below what the CPU has; the line says so (a
    fresh process: both are read once, at the first use)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("needs an x86 CPU with AVX2")
    code = ("from t2vz.experiment.benchmark import cpu_features, cpu_features_line; "
            "print(cpu_features_line(cpu_features()))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert "ATen ISA AVX2;" in line and "oneDNN bf16 no, fp16 no" in line, line
    assert line.endswith("ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2"), line


# ------------------------------------------------------------------------------------- warm-up, VAE dtype, SDPA
@pytest.fixture(scope="module")
def tiny_folders(benchmark_module, tmp_path_factory):
    """(diffusers folder, t2vz folder) of the benchmark's random tiny model."""
    return benchmark_module.prepare_models(tmp_path_factory.mktemp("bench"), "tiny", 0, log=lambda *a: None)


SMALL = dict(prompt="a horse galloping on the street", seed=0, num_frames=2, height=32, width=32,
             num_inference_steps=10, guidance_scale=7.5, motion_strength=12.0, t0=4, t1=7)


def unet_paths(runner, settings: dict) -> set[tuple[int, bool]]:
    """The (batch rows, full pass) of every UNet call of one generation: a cached pass (feature caching) skips
    the mid block, so whether it ran tells the two apart."""
    calls: list[list] = []
    unet = runner.unet
    handles = [unet.register_forward_pre_hook(lambda m, args: calls.append([args[0].shape[0], False])),
               unet.mid_block.register_forward_hook(lambda m, args, out: calls[-1].__setitem__(1, True))]
    try:
        runner.generate(settings)
    finally:
        for handle in handles:
            handle.remove()
    return {tuple(c) for c in calls}


def test_warmup_takes_every_unet_path_of_the_timed_run(benchmark_module, tiny_folders):
    """With feature caching every 3 steps the timed run makes full and cached UNet passes on frame 1 alone (2 rows)
    and on the video (2 · frames rows); the warm-up must make each of them too. The old 2-step warm-up missed
    frame 1's cached pass (its frame-1 loops had 0 and 1 steps)."""
    m = benchmark_module
    runner = m.load_runner("t2vz", str(tiny_folders[1]), torch.device("cpu"), torch.float32, mode="c3")
    timed = unet_paths(runner, SMALL)
    assert timed == {(2, True), (2, False), (4, True), (4, False)}
    warmup = m.warmup_settings(SMALL, 2, cache_interval=3)
    assert warmup["num_inference_steps"] == m.CACHED_WARMUP_STEPS
    assert unet_paths(runner, warmup) >= timed
    old_rule = {**SMALL, "num_inference_steps": 2, "t0": 0, "t1": 1}
    assert (2, False) in timed - unet_paths(runner, old_rule)


def test_warmup_rule(benchmark_module):
    rule = benchmark_module.warmup_settings
    assert rule(SMALL, 0) is None and rule(SMALL, 0, cache_interval=3, compile=True) is None
    assert rule(SMALL, 2) == {**SMALL, "num_inference_steps": 2, "t0": 0, "t1": 1}
    assert rule(SMALL, 1) == {**SMALL, "num_inference_steps": 1, "t0": 0, "t1": 0}
    assert rule(SMALL, 2, cache_interval=3)["num_inference_steps"] == 4
    assert rule(SMALL, 6, cache_interval=3)["num_inference_steps"] == 6
    assert rule(SMALL, 2, compile=True) == SMALL  # compiled: the timed run itself
    assert rule(SMALL, 2, cache_interval=3, compile=True) == SMALL


def test_vae_dtype_is_passed_to_both_implementations(benchmark_module, tiny_folders):
    """vae_dtype=fp32 under bf16: both VAEs in float32 and decoding the bf16 latents (diffusers' cast at its VAE's
    door); auto under fp16: each implementation's own default, t2vz float32, diffusers float16."""
    m = benchmark_module
    ref, ours = map(str, tiny_folders)
    cpu = torch.device("cpu")
    settings = {**SMALL, "num_inference_steps": 3, "t0": 0, "t1": 1}
    for impl, folder in (("t2vz", ours), ("diffusers", ref)):
        runner = m.load_runner(impl, folder, cpu, torch.bfloat16, vae_dtype=torch.float32)
        assert runner.vae_dtype == "fp32"
        frames = runner.generate(settings)
        assert frames.shape == (2, 32, 32, 3) and torch.isfinite(frames).all()
    assert m.load_runner("t2vz", ours, cpu, torch.bfloat16).vae_dtype == "bf16"
    assert m.load_runner("t2vz", ours, cpu, torch.float16).vae_dtype == "fp32"
    assert m.load_runner("diffusers", ref, cpu, torch.float16).vae_dtype == "fp16"
    assert m.load_runner("diffusers", ref, cpu, torch.float16, vae_dtype=torch.float32).vae_dtype == "fp32"
    assert m.PRESETS["sd15-512"]["vae_dtype"] == "fp32" and m.PRESETS["sd15-512"]["dtype"] == "fp16"


COMPONENT_FILES = {  # the innermost of these files on the stack names the component an attention call is in
    "unet": ("t2vz/sd/unet.py", "unet_2d_condition.py"),
    "vae": ("t2vz/sd/vae.py", "/autoencoders/"),
    "text encoder": ("modeling_clip.py",),
}


def calling_component() -> str | None:
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        for component, patterns in COMPONENT_FILES.items():
            if any(p in path for p in patterns):
                return component
        frame = frame.f_back
    return None


@pytest.mark.parametrize("impl", ["t2vz", "diffusers"])
def test_forced_sdpa_backend_acts_in_the_unet_only(benchmark_module, tiny_folders, monkeypatch, impl):
    """sdpa=math: every attention call inside the UNet runs with the other backends disabled, and every call of the
    text encoder and the VAE with PyTorch's default dispatch (all backends enabled), where a forced flash kernel
    could refuse CLIP's mask or the VAE's wide head."""
    calls: list[tuple[str | None, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append((calling_component(), torch.backends.cuda.flash_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    folder = str(tiny_folders[1] if impl == "t2vz" else tiny_folders[0])
    runner = benchmark_module.load_runner(impl, folder, torch.device("cpu"), torch.float32, sdpa="math")
    runner.generate({**SMALL, "num_inference_steps": 3, "t0": 0, "t1": 1})
    by_component = {c: {flash for comp, flash in calls if comp == c} for c in ("unet", "vae", "text encoder")}
    assert {comp for comp, _ in calls} == {"unet", "vae", "text encoder"}  # each component was seen
    assert by_component["unet"] == {False}  # forced: math only
    assert by_component["vae"] == {True} and by_component["text encoder"] == {True}  # the default dispatch
    assert torch.backends.cuda.flash_sdp_enabled()  # and left as it was after the generation


def test_forced_sdpa_can_be_removed():
    class Probe(torch.nn.Module):
        def forward(self, x):  # whether the flash backend is allowed, as seen inside forward
            return torch.backends.cuda.flash_sdp_enabled()

    module = Probe()
    scope = bench.ForcedSDPA(module, "math")
    assert module(None) is False and torch.backends.cuda.flash_sdp_enabled()  # forced inside forward only
    scope.remove()
    assert module(None) is True and "forward" not in module.__dict__
    with pytest.raises(ValueError, match="sdpa backend 'fast' is not one of"):
        bench.ForcedSDPA(module, "fast")


def test_sdpa_backend_names_agree(benchmark_module):
    assert benchmark_module.SDPA_BACKENDS == bench.SDPA_BACKENDS


# -------------------------------------------------------------------------------------------- experiments/gpu_check.sh
def test_gpu_check_exits_at_once_without_a_gpu():
    """No visible GPU (CUDA_VISIBLE_DEVICES empty hides them even where there are some): one line, exit 0, at once,
    nothing set up or run."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    out = subprocess.run(["bash", str(REPO / "experiments" / "gpu_check.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1 and "no GPU" in lines[0], lines
    assert elapsed < 5, elapsed

"""experiments/benchmark.py: the presets compose, and the small preset (1 round, 2 frames, 3 steps) runs end to end
and writes both tables with both implementations, equal frames, positive times, memory and FLOPs. No timing is
asserted: only that the numbers exist and are sane."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize
from omegaconf import OmegaConf

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
                                 (["sdpa=fast"], "sdpa")):
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

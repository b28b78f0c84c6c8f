#!/usr/bin/env bash
# GPU check: what the CPU-only machines cannot run, in one go on a machine with an NVIDIA GPU, ending in one table.
#
#   (a) the tests marked `cuda` (`pytest -m cuda`): tests/test_cuda_parity.py (the UNet, the VAE and the whole
#       Text2Video-Zero pipeline against diffusers on CUDA in fp32, fp16 and bf16 against fp32, each SDPA backend
#       forced on the UNet, torch.compile against eager) and whatever other tests/test_cuda_*.py carry the marker;
#   (b) the sd15-512 benchmark: experiments/benchmark.py preset=sd15-512 repeats=1 (random SD 1.5 weights, 8 frames
#       at 512x512, 50 DDIM steps, fp16 with the VAE in fp32; t2vz exact, m0.5, c3, m0.5_c3 beside diffusers and
#       diffusers + tomesd). Its random model is built and converted on the CPU while (a) runs on the GPU.
#
# Time budget: 8 minutes in all (GPU_CHECK_BUDGET_S=480); the tests get at most GPU_CHECK_TESTS_S=180 s of it, the
# benchmark the rest. A part that runs out of time is stopped, its subprocesses with it, and the table says so.
# These budgets are estimates: this script has not yet run on a GPU.
#
# Without a GPU it prints one line and exits 0: at once and setting up nothing where CUDA_VISIBLE_DEVICES is empty
# or -1 or nvidia-smi is missing or lists no GPU; after the set-up where .venv's torch sees no CUDA device.
#
# It uses .venv, set up by experiments/setup.sh only once a GPU has been found. PyPI's torch wheel for Linux x86-64
# is a CUDA build; elsewhere, or for another CUDA version, TORCH_SPEC (which setup.sh honours) names the torch to
# install, e.g. a CUDA wheel's file or URL. A .venv that already holds a CPU-only torch (a "+cpu" version) is not
# reinstalled by setup.sh: reinstall torch in it, or remove .venv and rerun.
#
#   bash experiments/gpu_check.sh                  # everything; logs and results in runs/gpu_check/DATE-TIME/
#   bash experiments/gpu_check.sh flops=false      # arguments are extra overrides of the benchmark
#   GPU_CHECK_OUT=runs/gpu_check/mine bash experiments/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1-}" = "-h" ] || [ "${1-}" = "--help" ]; then  # the header above, without its '# '
  sed -n '2,/^set -euo/p' experiments/gpu_check.sh | sed '$d; s/^# \{0,1\}//'
  exit 0
fi

# ---- a GPU, or one line and out
if [ "${CUDA_VISIBLE_DEVICES+set}" = set ] && { [ -z "$CUDA_VISIBLE_DEVICES" ] || [ "$CUDA_VISIBLE_DEVICES" = "-1" ]; }; then
  echo "gpu_check: no GPU visible (CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES'); nothing run"
  exit 0
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep '^GPU' >/dev/null; then
  echo "gpu_check: no GPU here (nvidia-smi missing or listing none); nothing run"
  exit 0
fi
bash experiments/setup.sh
py=.venv/bin/python
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no GPU for torch $("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?') in .venv (a CPU-only build? see TORCH_SPEC in this script's header); nothing run"
  exit 0
fi

budget=${GPU_CHECK_BUDGET_S:-480}
tests_budget=${GPU_CHECK_TESTS_S:-180}
out=${GPU_CHECK_OUT:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
start=$SECONDS
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sed -n 1p)
versions=$("$py" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")')
echo "gpu_check: $gpu; $versions; logs in $out" >&2

# ---- the benchmark's random SD 1.5 model, built and converted on the CPU meanwhile (cached under runs/benchmark,
# the benchmark's default workdir, where the benchmark then finds it)
PYTHONPATH=experiments "$py" -c 'import benchmark; benchmark.prepare_models("runs/benchmark", "sd15", 0)' \
  >"$out/build.log" 2>&1 &
build_pid=$!

# ---- (a) the cuda-marked tests; `timeout` stops the whole process group when the time is up
echo "gpu_check: (a) pytest -m cuda, at most ${tests_budget} s" >&2
set +e
timeout --kill-after=10 "$tests_budget" "$py" -m pytest -m cuda -rA -p no:cacheprovider >"$out/pytest.log" 2>&1
tests_rc=$?
set -e
tests_s=$((SECONDS - start))

set +e
wait "$build_pid"
build_rc=$?
set -e

# ---- (b) the sd15-512 benchmark with what is left of the budget
bench_start=$SECONDS
remaining=$((budget - (SECONDS - start)))
if [ "$build_rc" -ne 0 ]; then
  bench_rc=$build_rc
  echo "gpu_check: building the random SD 1.5 model failed (exit $build_rc); see $out/build.log" >&2
elif [ "$remaining" -lt 60 ]; then
  bench_rc=124
  echo "gpu_check: only ${remaining} s of the budget left; the benchmark was not started" >&2
else
  echo "gpu_check: (b) benchmark preset=sd15-512 repeats=1, at most ${remaining} s" >&2
  set +e
  timeout --kill-after=10 "$remaining" "$py" experiments/benchmark.py preset=sd15-512 repeats=1 \
    "hydra.run.dir=$out/benchmark" "$@" >"$out/benchmark.log" 2>&1
  bench_rc=$?
  set -e
fi
bench_s=$((SECONDS - bench_start))

# ---- one table: what ran, each pytest result, the benchmark's table
status() {  # exit status → words
  case "$1" in
    0) echo "ok" ;;
    124|137) echo "stopped: out of time" ;;
    *) echo "failed (exit $1)" ;;
  esac
}
pytest_summary=$(grep -E '^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* =+$' "$out/pytest.log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//' || true)
echo
echo "# GPU check: $gpu; $versions; $((SECONDS - start)) s in all (budget $budget s); logs in $out"
echo
echo "## (a) pytest -m cuda: $(status "$tests_rc"), ${tests_s} s: ${pytest_summary:-no summary (see $out/pytest.log)}"
echo
grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ' "$out/pytest.log" || true
echo
echo "## (b) sd15-512 benchmark, repeats=1: $(status "$bench_rc"), ${bench_s} s"
echo
if [ "$bench_rc" -eq 0 ] && [ -f "$out/benchmark/benchmark.md" ]; then
  cat "$out/benchmark/benchmark.md"
else
  tail -n 20 "$out/benchmark.log" 2>/dev/null || tail -n 20 "$out/build.log"
fi
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

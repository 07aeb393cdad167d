#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command (CI has no GPU, so these tests skip there):
#   1. the accelerator battery (every registered optimizer on CUDA vs the CPU run, skips, checkpoints
#      across devices, a one-rank NCCL group, FSDP2 on a CUDA mesh), SOAA's Triton passes and the host
#      syncs of ASGO's padded roots, the float32 roots of null-space Grams staying bounded (the map's floor);
#   2. SOAA's step against torch's fused AdamW on the GPU (10 x 1000x1000 and 10 x 4096x4096, fp32; the
#      latter also with the 2**18-element blocks of before the automatic block size);
#   3. ASGO against Muon and AdamW on a d=768, 12-layer transformer (asgo_bare_map: without the float32 map's
#      floor, for the roots recomputed by the eigendecomposition with and without it);
#   4. the whole training step of that transformer with SOAA's default (its Triton kernels) and the foreach
#      path (compile=False) against AdamW, profiled (profile_gpu_step.py).
# (benchmarks/tune_soaa_triton.py, the Triton kernels' program shapes, runs apart: about a minute.)
# Uses the machine's own python3 and its CUDA torch (no venv: a GPU machine brings its build); the
# results (test log, JSON, PNG) go to $1, default benchmarks/results; $2 picks "tests", "bench" or "all"
# (default). About 3-4 minutes on one H200 (the timeouts add up to 560 s, under a 600 s command limit;
# "tests" and "bench" as two commands leave each more room);
# extra arguments go to pytest (e.g. -k, --lf).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
what="${2:-all}"
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || status=1
"$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name())" || status=1
if [ "$what" != bench ]; then
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs --durations=8 \
  tests/conformance/test_accelerator.py tests/unit/test_soaa_cuda.py \
  "tests/unit/test_soaa_functional.py::test_compiled_kernels_on_cuda_match_the_reference" \
  "tests/unit/test_asgo_optim.py::test_padded_roots_add_no_host_sync_on_cuda" \
  "tests/unit/test_linalg.py::test_float32_roots_of_null_space_grams_stay_bounded_on_cuda" \
  "$@" 2>&1 | tee "$out/gpu_tests.log" || status=1
fi
[ "$what" = tests ] && exit $status
timeout 80 "$PY" benchmarks/bench_soaa_step.py --device cuda --threads 0 --steps 50 --rounds 5 \
  --with-sharded-adamw --results "$out" || status=1
# + SOAA with the blocks of 2**18 elements it used before the automatic block size (--block-numel): 64 per
# 4096x4096 matrix, 640 in all, each with host-side work per step (15-30 us on the CPU) that a GPU's memory
# bandwidth does not hide; the default keeps the matrices whole in one process
timeout 80 "$PY" benchmarks/bench_soaa_step.py --device cuda --threads 0 --shape 4096x4096 --steps 20 \
  --rounds 3 --block-numel 262144 --results "$out" || status=1
timeout 100 "$PY" benchmarks/bench_asgo.py --device cuda --threads 0 --d-model 768 --layers 12 --seq 256 \
  --batch 16 --vocab 256 --steps 20 --out "$out" || status=1
timeout 60 "$PY" benchmarks/profile_gpu_step.py --only adamw soaa soaa_foreach --results "$out" || status=1
exit $status

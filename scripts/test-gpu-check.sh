#!/usr/bin/env bash
# Tests scripts/gpu-check.sh without a GPU, PyTorch or Rust: its syntax, that no file of the
# project names a path of a particular machine, and `gpu-check.sh run` against stand-ins
# (scripts/testdata/gpu-check/: nvidia-smi, compute-sanitizer, the Python with PyTorch, and the
# carried binaries), with the full budget, a small one, none, and a failing preflight.
# About 25 s. Run by .ci/run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
STUBS=scripts/testdata/gpu-check
PASSED=0 FAILED=0

# ok WHAT CMD...: runs CMD, the assertion WHAT, and counts it as passed or failed.
ok() {
  local what=$1
  shift
  if "$@"; then
    PASSED=$((PASSED + 1))
  else
    FAILED=$((FAILED + 1))
    echo "FAILED: $what" >&2
  fi
}

# has FILE REGEX: FILE has a line matching the extended REGEX.
has() { grep -qE -- "$2" "$1"; }

# lacks FILE REGEX: no line of FILE matches the extended REGEX.
lacks() { ! grep -qE -- "$2" "$1"; }

# Makes a fresh stand-in world under $TMP/NAME: the stubs on PATH in bin/, the carried
# binaries in carry/ (left as copied: gpu-check.sh makes them executable), the Python
# packages' nvidia/ folders in site/; sets W to it.
world() {
  W=$TMP/$1
  mkdir -p "$W/bin" "$W/carry" "$W/state" "$W/out" "$W/site/nvidia/cudnn/lib" \
    "$W/site/nvidia/cu13/lib" "$W/site/nvidia/cublas/lib" "$W/site/nvidia/nccl/lib"
  cp "$STUBS/nvidia-smi" "$STUBS/compute-sanitizer" "$STUBS/python" "$W/bin/"
  cp "$STUBS/densenet" "$W/carry/"
  local t
  for t in cuda_ops cuda_step conv_error nvrtc data_parallel golden modes gradcheck; do
    cp "$STUBS/libtest" "$W/carry/$t"
  done
  chmod +x "$W/bin/"*
  touch "$W/site/nvidia/cudnn/lib/libcudnn.so.9" "$W/site/nvidia/cu13/lib/libcublasLt.so.13" \
    "$W/site/nvidia/cu13/lib/libnvrtc.so.13" "$W/site/nvidia/cublas/lib/libcublasLt.so.12" \
    "$W/site/nvidia/nccl/lib/libnccl.so.2"
}

# gpu_check [VAR=VALUE...]: `gpu-check.sh run` in the world W, with the variables; its stdout
# and stderr go to $W/stdout, its exit status to RC. The caller's CUDA settings, budget and
# DENSENET_* switches (.ci/run sets some) are cleared, so that only the stand-ins are seen.
gpu_check() {
  env -u LD_LIBRARY_PATH -u CUDA_HOME -u CUDA_VISIBLE_DEVICES -u NVCC -u GPU_CHECK_BUDGET_S \
    -u DENSENET_FORCE_NVRTC -u DENSENET_REQUIRE_NVRTC -u DENSENET_REQUIRE_PTX -u DENSENET_REQUIRE_GPU \
    PATH="$W/bin:$PATH" STUB_DIR="$PWD/$STUBS" STUB_STATE="$W/state" STUB_SITE="$W/site" \
    PYTHON="$W/bin/python" GPU_CHECK_CARRY="$W/carry" OUT="$W/out" "$@" \
    bash scripts/gpu-check.sh run >"$W/stdout" 2>&1
  RC=$?
}

# The runs of the stand-ins (but --list), one a line, with the carry folder left out of paths.
runs() { sed "s|$W/carry/||g" "$W/state/argv"; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

ok "bash -n scripts/gpu-check.sh" bash -n scripts/gpu-check.sh
# The bracketed letters keep this line from matching itself.
ok "no machine path in scripts/ docs/ README.md BENCHMARKS.md benches/" \
  bash -c "! git grep -nE --untracked '/wor[k]/|/roo[t]/|cudaen[v]' -- scripts docs README.md BENCHMARKS.md benches"

# The whole run, with the default budget.
world full
gpu_check
T=$W/out/table.txt
ok "a failed check makes the exit status non-zero (got $RC)" [ "$RC" -ne 0 ]
ok "table.txt ends stdout" bash -c "tail -n \$(wc -l <'$T') '$W/stdout' | cmp -s - '$T'"
ok "the failing test is FAILED" has "$T" '^  cuda_ops pooling_matches_the_cpu::gpu +FAILED \(rc 101\)'
ok "every other check is ok" [ "$(grep -cE '^  .*  (FAILED|skipped)' "$T")" = 1 ]
ok "34 checks" [ "$(sed -n '/^== checks/,/^$/p' "$T" | grep -c '^  ')" = 34 ]
ok "each test in its own process, smoke first, in order" diff -u - <(runs) <<'EOF'
densenet bench --device cuda --layers 10 --growth 4 --batch-size 2 --steps 1 --warmup 1 --json
cuda_ops --exact batch_norm_matches_the_cpu::gpu --nocapture --test-threads=1
cuda_step --exact training_step_matches_the_cpu::gpu --nocapture --test-threads=1
densenet bench --device cuda --layers 100 --growth 12 --batch-size 64 --steps 20 --warmup 5 --json --memory naive
densenet bench --device cuda --layers 100 --growth 12 --batch-size 64 --steps 20 --warmup 5 --json --memory shared
densenet bench --device cuda --layers 100 --growth 12 --batch-size 64 --steps 20 --warmup 5 --json --memory minimal
densenet bench --device cuda --layers 100 --growth 12 --batch-size 64 --steps 20 --warmup 5 --json --memory minimal --no-graphs
torch gpu --depth 100 --growth 12 --batch 64 --steps 20 --mode naive --warmup 5
torch gpu --depth 100 --growth 12 --batch 64 --steps 20 --mode naive --warmup 5 --deterministic
torch gpu --depth 100 --growth 12 --batch 64 --steps 20 --mode checkpointed --warmup 5
torch gpu --depth 100 --growth 12 --batch 64 --steps 20 --mode checkpointed --warmup 5 --deterministic
cuda_ops --exact convolutions_match_the_cpu::gpu --nocapture --test-threads=1
cuda_ops --exact pooling_matches_the_cpu::gpu --nocapture --test-threads=1
cuda_step --exact device_allocation_is_the_plan::gpu --nocapture --test-threads=1
cuda_step --exact two_runs_are_bitwise_identical::gpu --nocapture --test-threads=1
cuda_step --exact algorithm_record_is_reused_across_processes --nocapture --test-threads=1
conv_error --exact by_family::gpu --nocapture --test-threads=1
data_parallel --exact nccl_at_world_size_one_gpu --nocapture --test-threads=1
golden --exact bottleneck_matches_pytorch_in_every_mode::gpu --nocapture --test-threads=1
modes --exact bottleneck_modes_agree::gpu --nocapture --test-threads=1
modes --exact partial_batch_equals_a_plan_of_its_size::gpu --nocapture --test-threads=1
gradcheck --exact bottleneck_network_gradients_match_finite_differences::gpu --nocapture --test-threads=1
DENSENET_REQUIRE_NVRTC=1 DENSENET_REQUIRE_PTX=1 nvrtc --exact nvcc_ptx_has_every_kernel --nocapture --test-threads=1
DENSENET_REQUIRE_NVRTC=1 DENSENET_REQUIRE_PTX=1 nvrtc --exact nvrtc_compiles_every_kernel --nocapture --test-threads=1
DENSENET_FORCE_NVRTC=1 cuda_ops --exact batch_norm_matches_the_cpu::gpu --nocapture --test-threads=1
compute-sanitizer --tool memcheck --error-exitcode 1
densenet bench --device cuda --layers 10 --growth 4 --batch-size 2 --steps 1 --warmup 1 --json --no-graphs
compute-sanitizer --tool racecheck --error-exitcode 1
densenet bench --device cuda --layers 10 --growth 4 --batch-size 2 --steps 1 --warmup 1 --json --no-graphs
densenet bench --device cuda --arch densenet121 --image-size 224 --batch-size 64 --steps 20 --warmup 5 --json --memory naive
densenet bench --device cuda --arch densenet121 --image-size 224 --batch-size 64 --steps 20 --warmup 5 --json --memory shared
densenet bench --device cuda --arch densenet121 --image-size 224 --batch-size 64 --steps 20 --warmup 5 --json --memory minimal
torch gpu --arch densenet121 --image-size 224 --batch 64 --steps 20 --warmup 5 --mode naive
torch gpu --arch densenet121 --image-size 224 --batch 64 --steps 20 --warmup 5 --mode checkpointed
torch gpu --depth 100 --growth 12 --batch 64 --steps 20 --mode naive --warmup 10 --compile
EOF
ok "the items run under the variables both sides need" diff -u - <(grep -v LD_LIBRARY_PATH "$W/state/env") <<'EOF'
DENSENET_REQUIRE_GPU=1
NVIDIA_TF32_OVERRIDE=0
RUST_BACKTRACE=1
EOF
ok "cuDNN, cuBLASLt 13 (not 12), NVRTC and NCCL on LD_LIBRARY_PATH" has "$W/state/env" \
  "^LD_LIBRARY_PATH=$W/site/nvidia/nccl/lib:$W/site/nvidia/cu13/lib:$W/site/nvidia/cudnn/lib\$"
ok "each library's path logged" has "$W/out/gpu-check.log" "^libcublasLt.so.13: $W/site/nvidia/cu13/lib/libcublasLt.so.13\$"
ok "the preflight's Device line shown" has "$W/stdout" '^Device: NVIDIA Stub GPU'
ok "the budget shown at the start" has "$W/stdout" 'time budget 450 s'
# Columns: images/s (64 / step), step ms, alloc, GPU used (1500 - idle 500), process, after
# ctx, graphs.
ours=' +300 +1000 +800 +700  +'
torch=' +400 +1000 +950\* +-  +'
ok "row ours naive" has "$T" "^ours naive +6400 +10.00$ours"'replayed$'
ok "row ours shared" has "$T" "^ours shared +5818 +11.00$ours"'fell back: test$'
ok "row ours minimal" has "$T" "^ours minimal +5333 +12.00$ours"'replayed$'
ok "row ours minimal --no-graphs" has "$T" "^ours minimal --no-graphs +3200 +20.00$ours"'eager$'
ok "row torch naive" has "$T" "^torch naive +2133 +30.00$torch"'eager$'
ok "row torch naive det" has "$T" "^torch naive det +2000 +32.00$torch"'eager$'
ok "row torch checkpointed" has "$T" "^torch checkpointed +1600 +40.00$torch"'eager$'
ok "row torch checkpointed det" has "$T" "^torch checkpointed det +1524 +42.00$torch"'eager$'
ok "row torch naive compile" has "$T" "^torch naive compile \(optional\) +4000 +16.00$torch"'torch.compile$'
ok "the ImageNet table follows" has "$T" '^== densenet121 \(224x224, 1000 classes\), batch 64: 20 timed steps after 5 warm-up'
imagenet=$(sed -n '/^== densenet121 (224x224/,/^$/p' "$T")
ok "ImageNet row ours naive" grep -qE "^ours naive +6400 +10.00$ours"'replayed$' <<<"$imagenet"
ok "ImageNet row ours minimal" grep -qE "^ours minimal +5333 +12.00$ours"'replayed$' <<<"$imagenet"
ok "ImageNet row torchvision naive" grep -qE "^torchvision naive +2133 +30.00$torch"'eager$' <<<"$imagenet"
ok "ImageNet row torchvision memory_efficient" grep -qE "^torchvision memory_efficient +1600 +40.00$torch"'eager$' <<<"$imagenet"
ok "samples outside the timed window were taken" has "$W/out/items/ours-naive.smi" ', 99999$'
ok "no memory sample from outside the timed window" lacks "$T" '99[0-9]{3}'
for c in images/s alloc 'GPU used' process 'after ctx' graphs 'torch rows' 'Both sides: TF32 off'; do
  ok "the footer says what '$c' is" has "$T" "^$c:? "
done

# A budget that ends after the smoke items and a few benchmarks (each item needs 20 s left to
# start, and a benchmark stand-in takes about 1 s): the rest is skipped, and skips of items
# that are not smoke items do not fail the run.
world small
gpu_check GPU_CHECK_BUDGET_S=26
T=$W/out/table.txt
ok "budget-only skips pass (got $RC)" [ "$RC" -eq 0 ]
ok "smoke items ran" [ "$(grep -cE '^  (preflight|cuda_ops batch_norm_matches_the_cpu::gpu|cuda_step training_step_matches_the_cpu::gpu) +ok' "$T")" = 3 ]
ok "later items skipped for the budget" has "$T" '^  cuda_ops pooling_matches_the_cpu::gpu +skipped: time budget'
ok "sanitizers skipped for the budget" has "$T" '^  compute-sanitizer racecheck +skipped: time budget'
ok "a skipped benchmark row says so" has "$T" '^torch naive compile \(optional\) .*\(skipped: time budget'

# No budget at all: the smoke items are skipped, which fails the run.
world none
gpu_check GPU_CHECK_BUDGET_S=0
ok "skipped smoke items fail the run (got $RC)" [ "$RC" -ne 0 ]
ok "preflight skipped for the budget" has "$W/out/table.txt" '^  preflight +skipped: time budget'

# A failing preflight: the GPU items are skipped, PyTorch's rows and the NVRTC tests still run.
world preflight
gpu_check STUB_PREFLIGHT_FAIL=1
T=$W/out/table.txt
ok "a failed preflight fails the run (got $RC)" [ "$RC" -ne 0 ]
ok "preflight FAILED" has "$T" '^  preflight +FAILED \(rc 1\)'
ok "GPU items skipped after it" [ "$(grep -c '^  .*  skipped: the preflight failed' "$T")" = 23 ]
ok "PyTorch rows still run" has "$T" "^torch checkpointed det +1524 +42.00$torch"'eager$'
ok "torchvision rows still run" has "$T" "^torchvision memory_efficient +1600 +40.00$torch"'eager$'
ok "NVRTC tests still run" has "$T" '^  nvrtc nvrtc_compiles_every_kernel +ok'

if [ "$FAILED" -gt 0 ]; then
  echo "stdout of the last run ($W/stdout):" >&2
  cat "$W/stdout" >&2
fi
echo "gpu-check script test: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]

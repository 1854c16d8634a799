#!/usr/bin/env bash
# Every GPU check of the project, in one call of under 8 minutes on the lent GPU machine (see the
# device tool's README, /work/.library/device/README.md). Two halves:
#
#   bash scripts/gpu-check.sh prepare   # here, without a GPU
#     Builds the release binary and the GPU test binaries (tests/cuda_ops.rs, tests/cuda_step.rs,
#     tests/nvrtc.rs) with nvcc's sm_90 PTX embedded, copies them stripped to target/gpu-check/,
#     and prints the exact `run` tool call. nvcc: $NVCC, else nvcc on PATH, else the pip one in
#     /work/cudaenv. DENSENET_CUDA_ARCH (default sm_90: the H100 and H200 are Hopper).
#
#   bash scripts/gpu-check.sh run       # there, from the repository root
#     1. the GPU tests (they skip without a GPU; here a skip counts as a failure),
#     2. `densenet bench --device cuda`, BC-100-12, batch 64, in each memory mode,
#     3. PyTorch naive and checkpointed (benches/torch_densenet.py gpu),
#     4. the GPU op tests again with the kernels compiled by NVRTC at start
#        (DENSENET_FORCE_NVRTC=1), when libnvrtc is there,
#     then one table: images/s, step time, device memory (allocated, added by the process, and
#     nvidia-smi's peak). Each item has a time limit, and items are skipped once the run nears
#     its budget. Logs and the table go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-check
BUDGET_S=${GPU_CHECK_BUDGET_S:-390}

prepare() {
  set -e
  local nvcc=${NVCC:-}
  if [ -z "$nvcc" ]; then
    nvcc=$(command -v nvcc || true)
    [ -n "$nvcc" ] || nvcc=/work/cudaenv/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc
  fi
  [ -x "$nvcc" ] || { echo "error: no nvcc (set NVCC=/path/to/nvcc)" >&2; exit 1; }
  export NVCC="$nvcc" DENSENET_CUDA_ARCH=${DENSENET_CUDA_ARCH:-sm_90}
  echo "== building with NVCC=$NVCC DENSENET_CUDA_ARCH=$DENSENET_CUDA_ARCH"
  cargo build --release --bin densenet
  local tests=() t
  for t in cuda_ops cuda_step nvrtc; do
    [ -f "tests/$t.rs" ] && tests+=(--test "$t")
  done
  local json
  json=$(cargo test --release --no-run --message-format=json "${tests[@]}")
  rm -rf "$CARRY"
  mkdir -p "$CARRY"
  strip --strip-debug -o "$CARRY/densenet" target/release/densenet
  # Each test binary as target/gpu-check/<test name>.
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])' <<<"$json" | while read -r name exe; do
    strip --strip-debug -o "$CARRY/$name" "$exe"
  done
  ls -la "$CARRY"
  echo "total $(du -sm "$CARRY" | cut -f1) MiB to carry (the limit is 64 MiB with the working tree)"
  cat <<'EOF'

Now call the device tool (one call, about 8 minutes at most):
  run(command="bash scripts/gpu-check.sh run", carry=["target/gpu-check"], timeout_s=460)
and call give_back afterwards unless you rerun at once.
EOF
}

# Seconds left before the budget.
left() { echo $((BUDGET_S - SECONDS)); }

# `item NAME LIMIT_S SAMPLE CMD...`: runs CMD with output to the log and the screen, unless the
# budget is spent, and records NAME's exit status; with SAMPLE=1 also the device's used memory
# (MiB) every 100 ms into $TMP/NAME.smi.
item() {
  local name=$1 limit=$2 sample=$3
  shift 3
  if [ "$(left)" -lt 20 ]; then
    echo "SKIPPED $name: time budget spent" | tee -a "$LOG"
    echo "$name skipped" >>"$STATUS"
    return
  fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  echo "== $name (limit ${limit}s, $(left)s left)" | tee -a "$LOG"
  local start=$SECONDS rc smi=
  if [ "$sample" = 1 ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$TMP/$name.smi" 2>/dev/null &
    smi=$!
  fi
  timeout -k 5 "$limit" "$@" >"$TMP/$name.out" 2>&1
  rc=$?
  if [ -n "$smi" ]; then
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
  fi
  cat "$TMP/$name.out" >>"$LOG"
  tail -n 25 "$TMP/$name.out"
  if [ "$rc" -eq 0 ] && grep -q 'SKIPPED' "$TMP/$name.out"; then
    rc=99 # a GPU test that skipped on the GPU machine is a failure
  fi
  echo "$name rc=$rc ($((SECONDS - start))s)" | tee -a "$LOG"
  echo "$name $rc $((SECONDS - start))" >>"$STATUS"
}

# Adds the folder of the first `name` found among the Python packages to LD_LIBRARY_PATH (when
# the dynamic loader does not already know it).
add_lib() {
  local name=$1 found
  ldconfig -p 2>/dev/null | grep -q "$name" && return 0
  found=$("$PY" -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null |
    while read -r d; do [ -d "$d/nvidia" ] && find "$d/nvidia" -name "$name" 2>/dev/null; done | head -n 1)
  if [ -n "$found" ]; then
    export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "$name: $found"
  else
    echo "$name: not found"
    return 1
  fi
}

run() {
  PY=${PYTHON:-python3}
  OUT=${OUT:-$(mktemp -d)}
  TMP=$(mktemp -d)
  LOG="$OUT/gpu-check.log"
  STATUS="$TMP/status"
  : >"$LOG"
  : >"$STATUS"
  [ -x "$CARRY/densenet" ] || { echo "error: $CARRY/densenet missing: run 'bash scripts/gpu-check.sh prepare' here first and carry $CARRY" >&2; exit 1; }
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  } 2>&1 | tee -a "$LOG"
  add_lib libcudnn.so.9 >"$TMP/libs"
  HAVE_NVRTC=0
  add_lib libnvrtc.so.13 >>"$TMP/libs" && HAVE_NVRTC=1
  tee -a "$LOG" <"$TMP/libs"
  IDLE_MIB=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)

  local t
  for t in cuda_ops cuda_step nvrtc; do
    [ -x "$CARRY/$t" ] && item "test-$t" 120 0 "$CARRY/$t" --nocapture --test-threads=1
  done
  local mode
  for mode in naive shared minimal; do
    item "ours-$mode" 75 1 "$CARRY/densenet" bench --device cuda --layers 100 --growth 12 \
      --batch-size 64 --memory "$mode" --steps 20 --warmup 5 --json
  done
  for mode in naive checkpointed; do
    item "torch-$mode" 75 1 "$PY" benches/torch_densenet.py gpu --mode "$mode" --depth 100 \
      --growth 12 --batch 64 --steps 20 --warmup 5
  done
  if [ "$HAVE_NVRTC" = 1 ] && [ -x "$CARRY/cuda_ops" ]; then
    item "test-cuda_ops-nvrtc" 90 0 env DENSENET_FORCE_NVRTC=1 "$CARRY/cuda_ops" --nocapture --test-threads=1
  else
    echo "SKIPPED test-cuda_ops-nvrtc: no libnvrtc.so.13 here" | tee -a "$LOG"
  fi

  "$PY" - "$TMP" "$STATUS" "$IDLE_MIB" <<'PY' | tee "$OUT/table.txt"
import json, os, sys
tmp, status, idle = sys.argv[1], sys.argv[2], float(sys.argv[3] or 0)

def last_json(name):
    try:
        lines = open(os.path.join(tmp, name + ".out")).read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None

def smi_peak(name):
    try:
        vals = [float(v) for v in open(os.path.join(tmp, name + ".smi")).read().split() if v.strip()]
    except (OSError, ValueError):
        return None
    return max(vals) - idle if vals else None

print("\n== checks")
for line in open(status):
    parts = line.split()
    verdict = "skipped" if parts[1] == "skipped" else ("ok" if parts[1] == "0" else
              ("SKIPPED ON THE GPU" if parts[1] == "99" else f"FAILED (rc {parts[1]})"))
    print(f"  {parts[0]:<24}{verdict}" + (f"  {parts[2]}s" if len(parts) > 2 else ""))

print("\n== BC-100-12, batch 64, one training step (median)")
print(f"{'side':<22}{'images/s':>10}{'step ms':>10}{'alloc MiB':>11}{'process MiB':>13}{'GPU used MiB':>14}")
rows = [("ours-" + m, m) for m in ("naive", "shared", "minimal")] + [("torch-" + m, m) for m in ("naive", "checkpointed")]

def mib(v, width):
    return f"{v / 2**20:>{width}.0f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"

for name, mode in rows:
    j = last_json(name)
    smi = smi_peak(name)
    smi_s = f"{smi:>14.0f}" if smi is not None else f"{'?':>14}"
    if not j:
        print(f"{name:<22}{'-':>10}{'-':>10}{'-':>11}{'-':>13}{smi_s}")
        continue
    ips = j.get("images_per_s", 0.0)
    ms = j.get("step_ms", 1e3 * j.get("median_step_s", 0.0))
    # Ours: what the backend allocated on the device (the arena: equals the plan); PyTorch: the
    # caching allocator's max_memory_allocated after warm-up.
    alloc = next((j[k] for k in ("device_allocated_bytes", "max_memory_allocated_bytes", "planned_peak_bytes")
                  if j.get(k) is not None), None)
    process = j.get("device_process_bytes")
    print(f"{name:<22}{ips:>10.0f}{ms:>10.1f}{mib(alloc, 11)}{mib(process, 13)}{smi_s}")
print("alloc: ours = device_allocated_bytes (the arena the backend allocated; equals the plan), torch = "
      "max_memory_allocated after warm-up;\nprocess: ours = device_process_bytes, the device memory the process "
      "added as the driver counts it (context, kernels, cuDNN, arena, graphs; torch: not reported);\nGPU used: "
      "peak of nvidia-smi's memory.used during the run minus idle (CUDA context, libraries and workspaces included).")
PY
  if awk '$2 != "0" { bad = 1 } END { exit !bad }' "$STATUS"; then
    echo "gpu-check: some checks failed or were skipped (see above and $LOG)"
    return 1
  fi
  echo "gpu-check: all checks passed"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *)
    echo "usage: bash scripts/gpu-check.sh prepare   (here)  |  bash scripts/gpu-check.sh run   (on the GPU machine)" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Every GPU check of the project, in two halves:
#
#   bash scripts/gpu-check.sh prepare   # on the build machine; no GPU needed
#     Builds the release binary and the GPU test binaries (tests/cuda_ops.rs, tests/cuda_step.rs,
#     tests/conv_error.rs, tests/nvrtc.rs, and the bodies every backend runs: tests/golden.rs,
#     tests/modes.rs, tests/gradcheck.rs) with nvcc's PTX embedded, copies them stripped to target/gpu-check/ and
#     prints `densenet --version` (the kernels' build). nvcc, the first found of: $NVCC,
#     $CUDA_HOME/bin/nvcc, nvcc on PATH, the pip package in the virtual environment .ci/run
#     creates. DENSENET_CUDA_ARCH (e.g. sm_90) is passed on to the build when set; without it
#     build.rs emits the oldest PTX nvcc offers, which every newer GPU accepts.
#
#   bash scripts/gpu-check.sh run       # on a GPU machine, from the repository root
#     Needs target/gpu-check/ from `prepare` (or GPU_CHECK_CARRY=DIR), an NVIDIA driver, and a
#     Python with PyTorch and the pip CUDA libraries (nvidia-cudnn-cu13, nvidia-cublas, nvidia-nccl-cu13,
#     nvidia-cuda-nvrtc): PYTHON=/path/to/python, default python3. No Rust. Smoke first, within
#     one time budget (GPU_CHECK_BUDGET_S, default 450 s):
#       1. preflight: `densenet bench --device cuda` on a tiny network (opens the GPU, plans,
#          runs one step); if it fails, the other GPU items are skipped (PyTorch's still run),
#       2. one op against the CPU (the first GPU test of cuda_ops),
#       3. one whole training step against the CPU (training_step_matches_the_cpu::gpu),
#       4. the benchmarks, DenseNet-BC-100-12 at batch 64: ours in each memory mode, and minimal
#          with --no-graphs; PyTorch naive and checkpointed, each with cuDNN's benchmark search
#          over all algorithms and over the deterministic ones,
#       5. the other GPU tests (cuda_ops, cuda_step, then conv_error: each cuDNN algorithm
#          family's error against float64; then the PyTorch golden data, the memory modes'
#          agreement and the finite differences, on the GPU),
#       6. the NVRTC tests, and one op test with the kernels compiled by NVRTC,
#       7. compute-sanitizer memcheck and racecheck over the preflight, where installed,
#       8. the ImageNet benchmarks, DenseNet-121 at 224x224 and batch 64: ours in each memory
#          mode; torchvision's densenet121 naive and with memory_efficient=True (each needs 45 s
#          of the budget left),
#       9. the optional torch.compile row, when 90 s remain.
#     Each test runs in its own process (a sticky device fault spoils only its own test), under
#     DENSENET_REQUIRE_GPU=1 (a GPU test that cannot open the GPU fails instead of skipping).
#     What the budget no longer allows is skipped and listed; such a skip fails the run only
#     for the smoke items 1-3, which must run. Output in $OUT (default: a new temporary folder):
#     gpu-check.log, items/NAME.out (and the memory samples items/NAME.smi, NAME.apps),
#     checks.tsv and table.txt: the checks and the benchmark table, which also end stdout.
#     Exit status 1 when a check failed or a smoke item was skipped.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
CARRY=${GPU_CHECK_CARRY:-target/gpu-check}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
# The test binaries whose bodies run on every backend (their ::gpu tests run here).
BACKEND_TESTS="golden modes gradcheck"
# The benchmarked networks and run, for both sides: the CIFAR one, and the ImageNet preset.
LAYERS=100 GROWTH=12 BATCH=64 STEPS=20 WARMUP=5
ARCH=densenet121 IMAGE_SIZE=224

# Sets NVCC and NVCC_FROM to the nvcc to build with; fails when there is none.
find_nvcc() {
  local pip
  if [ -n "${NVCC:-}" ]; then
    NVCC_FROM="\$NVCC"
  elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    NVCC=$CUDA_HOME/bin/nvcc NVCC_FROM="\$CUDA_HOME"
  elif NVCC=$(command -v nvcc); then
    NVCC_FROM=PATH
  else
    for pip in "${TMPDIR:-/tmp}"/densenet-ci-venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
      [ -x "$pip" ] && NVCC=$pip NVCC_FROM="the pip package in .ci/run's virtual environment" && return 0
    done
    return 1
  fi
}

# Builds and strips the binaries `run` needs into $CARRY.
prepare() {
  set -e
  find_nvcc || {
    echo "error: no nvcc: set NVCC=/path/to/nvcc or CUDA_HOME, put nvcc on PATH, or run .ci/run" \
      "once (it installs CUDA 13.0's nvcc from PyPI in its virtual environment)" >&2
    exit 1
  }
  [ -x "$NVCC" ] || { echo "error: $NVCC (from $NVCC_FROM) is not executable" >&2; exit 1; }
  export NVCC
  echo "== nvcc from $NVCC_FROM: $NVCC"
  "$NVCC" --version | grep -i release || true
  echo "DENSENET_CUDA_ARCH=${DENSENET_CUDA_ARCH:-(unset: the oldest PTX nvcc offers)}"
  cargo build --release --bin densenet
  local tests=() t json
  for t in cuda_ops cuda_step conv_error nvrtc data_parallel $BACKEND_TESTS; do
    [ -f "tests/$t.rs" ] && tests+=(--test "$t")
  done
  json=$(cargo test --release --no-run --message-format=json "${tests[@]}")
  rm -rf "$CARRY"
  mkdir -p "$CARRY"
  strip --strip-debug -o "$CARRY/densenet" target/release/densenet
  # Each test binary as $CARRY/<test name>.
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])' <<<"$json" | while read -r name exe; do
    strip --strip-debug -o "$CARRY/$name" "$exe"
  done
  ls -la "$CARRY"
  echo "total $(du -sm "$CARRY" | cut -f1) MiB to carry"
  echo "== target/release/densenet --version"
  target/release/densenet --version
  cat <<EOF

Next, on a GPU machine with $CARRY/ copied into the repository: bash scripts/gpu-check.sh run
(it ends within GPU_CHECK_BUDGET_S=$BUDGET_S s and a few seconds more).
EOF
}

# Seconds of the budget left.
left() { echo $((BUDGET_S - SECONDS)); }

# Prints its arguments as one line, to stdout and the log.
say() { echo "$*" | tee -a "$LOG"; }

# record NAME VERDICT SECONDS SMOKE: adds one line to the checks list.
record() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$CHECKS"; }

# Starts nvidia-smi sampling every 100 ms, with its own timestamps, into $1.smi (the GPU's
# memory.used) and $1.apps (each compute process's used memory); line-buffered so that nothing
# is lost when it is stopped.
start_samplers() {
  local linebuf=()
  command -v stdbuf >/dev/null && linebuf=(stdbuf -oL)
  "${linebuf[@]}" nvidia-smi -i "$GPU" --query-gpu=timestamp,memory.used --format=csv,noheader,nounits \
    -lms 100 >"$1.smi" 2>&1 &
  SAMPLERS=($!)
  "${linebuf[@]}" nvidia-smi --query-compute-apps=timestamp,gpu_uuid,pid,used_memory \
    --format=csv,noheader,nounits -lms 100 >"$1.apps" 2>&1 &
  SAMPLERS+=($!)
}

# Stops the samplers start_samplers started, after one more sample.
stop_samplers() {
  [ "${#SAMPLERS[@]}" -gt 0 ] || return 0
  sleep 0.2
  kill "${SAMPLERS[@]}" 2>/dev/null
  wait "${SAMPLERS[@]}" 2>/dev/null
  SAMPLERS=()
}

# check NAME FLAGS LIMIT_S CMD...: runs CMD in its own process as the check NAME, output to
# items/NAME.out (its pid to items/NAME.pid) and the log, stopped after LIMIT_S or when the
# budget ends, and records the verdict; fails unless CMD passed. FLAGS, space-separated:
# smoke (a skip fails the run), gpu (skipped once the preflight failed), test (CMD is one
# libtest test, which must report "1 passed"), sample (the memory samplers run meanwhile),
# need=N (skipped when less than N s of the budget are left; default 20).
check() {
  local name=$1 flags=" $2 " limit=$3
  shift 3
  local file="$ITEMS/${name//[^A-Za-z0-9._-]/_}" smoke=0 need=20 start=$SECONDS rc verdict
  [[ $flags == *" smoke "* ]] && smoke=1
  [[ $flags =~ \ need=([0-9]+)\  ]] && need=${BASH_REMATCH[1]}
  if [ "$(left)" -lt "$need" ]; then
    verdict="skipped: time budget ($(left) s left, needs $need s)"
  elif [[ $flags == *" gpu "* ]] && [ "$PREFLIGHT" != ok ]; then
    verdict="skipped: the preflight failed"
  fi
  if [ -n "${verdict:-}" ]; then
    say "-- $name: $verdict"
    record "$name" "$verdict" - "$smoke"
    return 1
  fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  say "== $name (limit $limit s, $(left) s left): $*"
  [[ $flags == *" sample "* ]] && start_samplers "$file"
  # shellcheck disable=SC2016 # expanded by the inner shell, whose pid is CMD's after exec
  timeout -k 5 "$limit" bash -c 'echo $$ >"$0"; exec "$@"' "$file.pid" "$@" >"$file.out" 2>&1
  rc=$?
  stop_samplers
  cat "$file.out" >>"$LOG"
  if [ "$rc" -eq 124 ]; then
    verdict="FAILED (timed out after $limit s)"
  elif [ "$rc" -ne 0 ]; then
    verdict="FAILED (rc $rc)"
  elif [[ $flags == *" test "* ]] && ! grep -q '^test result: ok\. 1 passed' "$file.out"; then
    verdict="FAILED (ran no test)"
  else
    verdict=ok
  fi
  [ "$verdict" = ok ] || tail -n 30 "$file.out"
  say "-- $name: $verdict ($((SECONDS - start)) s)"
  record "$name" "$verdict" "$((SECONDS - start))" "$smoke"
  [ "$verdict" = ok ]
}

# run_test BIN TEST FLAGS [VAR=VALUE...]: the check "BIN TEST": that one test of the carried
# test binary BIN, alone in its process, with the variables set.
run_test() {
  local bin=$1 test=$2 flags=$3
  shift 3
  local cmd=("$CARRY/$bin" --exact "$test" --nocapture --test-threads=1)
  [ "$#" -eq 0 ] || cmd=(env "$@" "${cmd[@]}")
  check "$bin $test" "test $flags" 120 "${cmd[@]}"
}

# list_tests BIN: the names of the carried test binary's tests, one a line, in its order.
list_tests() {
  [ -x "$CARRY/$1" ] && "$CARRY/$1" --list 2>>"$LOG" | sed -n 's/: test$//p'
}

# Makes the carried binaries executable and checks with ldd that each finds its libraries
# ("not a dynamic executable" is fine); records the check "carried binaries".
check_carried() {
  local bin missing list problems=()
  for bin in densenet cuda_ops cuda_step conv_error nvrtc data_parallel $BACKEND_TESTS; do
    if [ ! -f "$CARRY/$bin" ]; then
      problems+=("$bin is missing")
      continue
    fi
    chmod +x "$CARRY/$bin" 2>>"$LOG" || [ -x "$CARRY/$bin" ] || problems+=("$bin is not executable")
    echo "ldd $CARRY/$bin:" >>"$LOG"
    missing=$(ldd "$CARRY/$bin" 2>&1 | tee -a "$LOG" | awk '/not found/ { printf "%s%s", sep, $1; sep = ", " }')
    [ -z "$missing" ] || problems+=("$bin: $missing not found")
  done
  if [ "${#problems[@]}" -eq 0 ]; then
    record "carried binaries" ok 0 0
  else
    list=$(printf '%s; ' "${problems[@]}")
    say "carried binaries: FAILED: ${list%; }"
    record "carried binaries" "FAILED (${list%; })" 0 0
  fi
}

# find_lib NAME: where the dynamic loader takes NAME from (a folder on LD_LIBRARY_PATH, then
# its cache), else the first NAME in a Python package's nvidia/ folder; fails when none.
find_lib() {
  local dir path
  local IFS=:
  for dir in ${LD_LIBRARY_PATH:-}; do
    [ -n "$dir" ] && [ -e "$dir/$1" ] && echo "$dir/$1" && return 0
  done
  IFS=$'\n'
  path=$( (ldconfig -p || /sbin/ldconfig -p) 2>/dev/null | awk -v n="$1" '$1 == n { print $NF; exit }')
  [ -n "$path" ] || path=$(for dir in $SITE_DIRS; do
    [ -d "$dir/nvidia" ] && find "$dir/nvidia" -name "$1" 2>/dev/null
  done | head -n 1)
  [ -n "$path" ] && echo "$path"
}

# add_lib NAME...: puts the folder of the first NAME found (find_lib) on LD_LIBRARY_PATH and
# logs the path; fails when none is found.
add_lib() {
  local name path
  for name in "$@"; do
    path=$(find_lib "$name") || continue
    case ":${LD_LIBRARY_PATH:-}:" in
      *":${path%/*}:"*) ;;
      *) export LD_LIBRARY_PATH="${path%/*}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
    say "$name: $path"
    return 0
  done
  say "$*: not found (on LD_LIBRARY_PATH, in the loader's cache, or in $PYTHON's site-packages/nvidia)"
  return 1
}

# Sets up the environment of every item and logs it: the variables both sides run under, the
# CUDA libraries, the GPU (its nvidia-smi index GPU, uuid GPU_UUID and idle memory IDLE_MIB),
# the versions of our build and of PyTorch.
environment() {
  export RUST_BACKTRACE=1 NVIDIA_TF32_OVERRIDE=0 DENSENET_REQUIRE_GPU=1
  # CUDA numbers devices as nvidia-smi does; GPU 0 of the tests and of PyTorch is nvidia-smi's $GPU.
  export CUDA_DEVICE_ORDER=PCI_BUS_ID
  GPU=${CUDA_VISIBLE_DEVICES:-0}
  GPU=${GPU%%,*}
  say "RUST_BACKTRACE=1 NVIDIA_TF32_OVERRIDE=0 DENSENET_REQUIRE_GPU=1 CUDA_DEVICE_ORDER=PCI_BUS_ID"
  SITE_DIRS=$("$PYTHON" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>>"$LOG")
  add_lib libcudnn.so.9
  # cuDNN's legacy convolutions load cuBLASLt at run time.
  add_lib libcublasLt.so.13 libcublasLt.so.12
  add_lib libnvrtc.so.13 libnvrtc.so.12
  # Data-parallel jobs on GPUs load NCCL at run time (PyTorch's pip NCCL).
  add_lib libnccl.so.2
  local line
  line=$(nvidia-smi -i "$GPU" --query-gpu=name,uuid,memory.total,memory.used,driver_version \
    --format=csv,noheader,nounits 2>&1 | head -n 1)
  IFS=, read -r _ GPU_UUID _ IDLE_MIB _ <<<"$line"
  GPU_UUID=${GPU_UUID# } IDLE_MIB=${IDLE_MIB# }
  say "GPU $GPU (nvidia-smi: name, uuid, MiB total, MiB used while idle, driver): $line"
  line=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>&1 | grep -E '^[0-9]+,')
  [ -z "$line" ] || say "warning: the GPU is not idle, nvidia-smi lists compute processes (pid, MiB): $line"
  say "densenet --version: $("$CARRY/densenet" --version 2>&1)"
  local torch='import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN",
  torch.backends.cudnn.version(), "GPU visible:", torch.cuda.is_available())'
  say "$PYTHON: $("$PYTHON" -c "$torch" 2>&1 | tail -n 1)"
}

# The timed rows of the table: ours in each memory mode and eager, then PyTorch's.
benchmarks() {
  local mode ours=("$CARRY/densenet" bench --device cuda --layers "$LAYERS" --growth "$GROWTH"
    --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --json)
  local torch=("$PYTHON" benches/torch_densenet.py gpu --depth "$LAYERS" --growth "$GROWTH"
    --batch "$BATCH" --steps "$STEPS")
  for mode in naive shared minimal; do
    check "ours-$mode" "gpu sample" 90 "${ours[@]}" --memory "$mode"
  done
  check ours-minimal-eager "gpu sample" 90 "${ours[@]}" --memory minimal --no-graphs
  for mode in naive checkpointed; do
    check "torch-$mode" sample 90 "${torch[@]}" --mode "$mode" --warmup "$WARMUP"
    check "torch-$mode-det" sample 90 "${torch[@]}" --mode "$mode" --warmup "$WARMUP" --deterministic
  done
}

# The ImageNet rows, ours in each memory mode against torchvision naive and memory-efficient
# (torch_densenet.py's checkpointed mode), each while 45 s of the budget remain.
imagenet_benchmarks() {
  local mode ours=("$CARRY/densenet" bench --device cuda --arch "$ARCH" --image-size "$IMAGE_SIZE"
    --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --json)
  local torch=("$PYTHON" benches/torch_densenet.py gpu --arch "$ARCH" --image-size "$IMAGE_SIZE"
    --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP")
  for mode in naive shared minimal; do
    check "ours-$ARCH-$mode" "gpu sample need=45" 90 "${ours[@]}" --memory "$mode"
  done
  check "torch-$ARCH-naive" "sample need=45" 90 "${torch[@]}" --mode naive
  check "torch-$ARCH-memory-efficient" "sample need=45" 90 "${torch[@]}" --mode checkpointed
}

# The optional last row: torch.compile(mode="reduce-overhead"), compiling in its warm-up steps.
compiled_torch() {
  check torch-naive-compile "sample need=90" 240 "$PYTHON" benches/torch_densenet.py gpu --depth "$LAYERS" \
    --growth "$GROWTH" --batch "$BATCH" --steps "$STEPS" --mode naive --warmup 10 --compile
}

# Prints the path of compute-sanitizer (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin); fails
# when there is none.
find_sanitizer() {
  local cs
  for cs in "$(command -v compute-sanitizer)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
    /usr/local/cuda/bin/compute-sanitizer; do
    [ -n "$cs" ] && [ -x "$cs" ] && echo "$cs" && return 0
  done
  return 1
}

# Prints the checks and the benchmark table from $OUT (table.txt is written by the caller);
# exits 1 when a check failed or a smoke item was skipped.
report() {
  python3 - "$OUT" "$IDLE_MIB" "$GPU_UUID" "$BATCH" "$ARCH" \
    "DenseNet-BC-$LAYERS-$GROWTH (32x32), batch $BATCH: $STEPS timed steps after $WARMUP warm-up" \
    "$ARCH ($IMAGE_SIZE""x$IMAGE_SIZE, 1000 classes), batch $BATCH: $STEPS timed steps after $WARMUP warm-up" <<'PY'
import datetime, json, os, re, sys

out, idle, uuid, batch, arch, cifar_title, imagenet_title = sys.argv[1:]
items = os.path.join(out, "items")
idle = float(idle) if re.fullmatch(r"[0-9.]+", idle) else None
batch = int(batch)

checks = [line.rstrip("\n").split("\t") for line in open(os.path.join(out, "checks.tsv"))]
verdicts = {c[0]: c[1] for c in checks}
print("\n== checks")
width = max(len(c[0]) for c in checks) + 2
for name, verdict, secs, smoke in checks:
    print(f"  {name:<{width}}{verdict}" + (f"  ({secs} s)" if secs != "-" else ""))

def read(name, ext):
    try:
        return open(os.path.join(items, name + ext)).read()
    except OSError:
        return ""

def last_json(name):
    for line in reversed(read(name, ".out").splitlines()):
        try:
            j = json.loads(line)
        except ValueError:
            continue
        if isinstance(j, dict):
            return j
    return None

def samples(name, ext, nfields):
    """nvidia-smi's CSV lines of items/NAME.EXT with a leading timestamp, as (unix s, fields)."""
    rows = []
    for line in read(name, ext).splitlines():
        f = [v.strip() for v in line.split(",")]
        if len(f) != nfields:
            continue
        try:
            t = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        rows.append((t, f[1:]))
    return rows

def window(j):
    try:
        return float(j["timed_start_unix_s"]), float(j["timed_end_unix_s"])
    except (KeyError, TypeError, ValueError):
        return None

def gpu_used(name, w):
    """Peak memory.used (MiB) over the timed window, less the idle figure."""
    vals = []
    for t, (used,) in samples(name, ".smi", 2):
        if w[0] <= t <= w[1] and re.fullmatch(r"[0-9.]+", used):
            vals.append(float(used))
    return f"{max(vals) - idle:.0f}" if vals and idle is not None else "?"

def process(name, w):
    """Peak per-process used_memory (MiB) of the benchmark's pid over the timed window, else
    (marked *) the peak of the sum over the GPU's compute processes."""
    pid = read(name, ".pid").strip()
    own, total = {}, {}
    for t, (gpu, p, used) in samples(name, ".apps", 4):
        if not (w[0] <= t <= w[1]) or (uuid and gpu != uuid) or not re.fullmatch(r"[0-9.]+", used):
            continue
        total[t] = total.get(t, 0.0) + float(used)
        if p == pid:
            own[t] = own.get(t, 0.0) + float(used)
    if own:
        return f"{max(own.values()):.0f}"
    return f"{max(total.values()):.0f}*" if total else "?"

def mib(v):
    return f"{v / 2**20:.0f}" if isinstance(v, (int, float)) else "-"

cifar = [("ours naive", "ours-naive"), ("ours shared", "ours-shared"),
         ("ours minimal", "ours-minimal"), ("ours minimal --no-graphs", "ours-minimal-eager"),
         ("torch naive", "torch-naive"), ("torch naive det", "torch-naive-det"),
         ("torch checkpointed", "torch-checkpointed"),
         ("torch checkpointed det", "torch-checkpointed-det"),
         ("torch naive compile (optional)", "torch-naive-compile")]
imagenet = [("ours naive", f"ours-{arch}-naive"), ("ours shared", f"ours-{arch}-shared"),
            ("ours minimal", f"ours-{arch}-minimal"), ("torchvision naive", f"torch-{arch}-naive"),
            ("torchvision memory_efficient", f"torch-{arch}-memory-efficient")]
results = {item: last_json(item) for _, item in cifar + imagenet}

print("\n== benchmarks")
for side in ("ours", "torch"):
    j = next((results[i] for i in results if i.startswith(side) and results[i]), None)
    if j:
        cudnn = j.get("cudnn") or {}
        extra = f", torch {j['torch']}" if j.get("torch") else ""
        print(f"{side}: {j.get('device')}{extra}; cuDNN {cudnn.get('version', '?')}"
              + (f" (CUDA {cudnn['cuda']})" if cudnn.get("cuda") else "")
              + (f" from {cudnn['path']}" if cudnn.get("path") else ""))
head = ["images/s", "step ms", "alloc MiB", "GPU used MiB", "process MiB", "after ctx MiB"]
widths = [len(h) + 2 for h in head]

def table(title, rows):
    """One benchmark table: a line per (label, item)."""
    print(f"\n== {title}, median step (wall clock)")
    print(f"{'row':<30}" + "".join(f"{h:>{w}}" for h, w in zip(head, widths)) + "  graphs")
    for label, item in rows:
        j = results[item]
        if not j:
            print(f"{label:<30}" + "".join(f"{'-':>{w}}" for w in widths) + f"  ({verdicts.get(item, 'not run')})")
            continue
        win = window(j)
        step = j.get("step_ms")
        alloc = j.get("device_allocated_bytes", j.get("max_memory_allocated_bytes"))
        cells = [f"{batch * 1e3 / step:.0f}" if step else "-", f"{step:.2f}" if step else "-", mib(alloc),
                 gpu_used(item, win) if win else "?", process(item, win) if win else "?",
                 mib(j.get("device_process_bytes"))]
        print(f"{label:<30}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + f"  {j.get('graphs') or '-'}")

table(cifar_title, cifar)
table(imagenet_title, imagenet)

idle_s = f"{idle:.0f} MiB" if idle is not None else "unknown"
print(f"""
images/s: {batch} / the median step.
step ms: the median wall-clock time of one training step, both sides alike: from copying the
  batch (held in host memory) to the device to reading the loss back.
alloc: ours = device_allocated_bytes, the one arena we allocate (it equals the memory plan);
  torch = torch.cuda.max_memory_allocated() over the timed steps (peak reset after the
  warm-up and torch.cuda.empty_cache()).
GPU used: the peak of nvidia-smi's memory.used for the whole GPU (sampled every 100 ms) over
  the timed steps only, less the idle figure measured before any item ({idle_s}): context,
  libraries, caches and workspaces included; cuDNN's algorithm search (ours while planning,
  torch's benchmark trials during the warm-up) lies outside that window.
process: the peak over the timed steps of nvidia-smi's used_memory for the benchmark's pid;
  * = that pid was not listed (another pid namespace): the sum over the GPU's compute processes.
after ctx: ours = device_process_bytes, the device memory in use that was added after our CUDA
  context was created (the context itself excluded); not a process footprint.
graphs: ours = how the timed steps ran (replayed: the step's CUDA graph; eager: every op
  issued, --no-graphs; fell back: graph capture failed, eager); torch = eager, or
  torch.compile(mode="reduce-overhead"): PyTorch's own CUDA graphs where it can use them (its
  output in items/torch-naive-compile.out says when it cannot); an optional row.
torch rows: cudnn.benchmark=True; det = also cudnn.deterministic=True (the timed choice among
  deterministic algorithms only). torchvision rows: torchvision.models.{arch}(num_classes=1000),
  naive or memory_efficient=True (its dense layers' concat + BN + ReLU + 1x1 conv recomputed in
  backward), cudnn.benchmark=True.
Both sides: TF32 off (NVIDIA_TF32_OVERRIDE=0, torch allow_tf32=False); ours uses only
  deterministic cuDNN algorithms (FMA math). ?: not reported, or no sample inside the timed
  window; -: no result (the item's verdict in parentheses).""")

failed = [c[0] for c in checks if c[1].startswith("FAILED") or (c[1].startswith("skipped") and c[3] == "1")]
skipped = sum(c[1].startswith("skipped") for c in checks)
if failed:
    print(f"\ngpu-check: {len(failed)} of {len(checks)} checks failed or, as smoke items, were skipped: {', '.join(failed)}")
    sys.exit(1)
print(f"\ngpu-check: all {len(checks) - skipped} checks that ran passed ({skipped} skipped)")
PY
}

# Every check on this GPU machine, smoke first, then the report.
run() {
  PYTHON=${PYTHON:-python3}
  OUT=${OUT:-$(mktemp -d)}
  ITEMS=$OUT/items LOG=$OUT/gpu-check.log CHECKS=$OUT/checks.tsv
  SAMPLERS=() PREFLIGHT=not-run IDLE_MIB='' GPU_UUID=''
  mkdir -p "$ITEMS" || exit 1
  : >"$LOG"
  : >"$CHECKS"
  [ -f "$CARRY/densenet" ] || {
    echo "error: $CARRY/densenet missing: run 'bash scripts/gpu-check.sh prepare' on the build machine and copy $CARRY here" >&2
    exit 1
  }
  say "gpu-check run: time budget $BUDGET_S s (GPU_CHECK_BUDGET_S); output in $OUT"
  check_carried
  environment

  local op_tests step_tests error_tests nvrtc_tests backend_tests bin t first_op=
  mapfile -t op_tests < <(list_tests cuda_ops | grep '::gpu$')
  mapfile -t step_tests < <(list_tests cuda_step | grep '::gpu$')
  mapfile -t error_tests < <(list_tests conv_error | grep '::gpu$')
  mapfile -t nvrtc_tests < <(list_tests nvrtc)
  local preflight=("$CARRY/densenet" bench --device cuda --layers 10 --growth 4 --batch-size 2
    --steps 1 --warmup 1 --json)
  local whole_step=training_step_matches_the_cpu::gpu

  # Smoke: the GPU opens and trains a tiny net, one op and one whole step match the CPU.
  if check preflight smoke 120 "${preflight[@]}"; then PREFLIGHT=ok; else PREFLIGHT=failed; fi
  say "$(grep -m 1 '^Device:' "$ITEMS/preflight.out" 2>/dev/null || echo 'Device: (no line from the preflight)')"
  if [ "${#op_tests[@]}" -gt 0 ]; then
    first_op=${op_tests[0]}
    run_test cuda_ops "$first_op" "smoke gpu"
  else
    record "cuda_ops (first ::gpu test)" "FAILED (cuda_ops --list names no ::gpu test)" - 1
  fi
  if [[ " ${step_tests[*]} " == *" $whole_step "* ]]; then
    run_test cuda_step "$whole_step" "smoke gpu"
  else
    record "cuda_step $whole_step" "FAILED (not in cuda_step --list)" - 1
  fi

  benchmarks

  for t in "${op_tests[@]:1}"; do run_test cuda_ops "$t" gpu; done
  for t in "${step_tests[@]}"; do [ "$t" = "$whole_step" ] || run_test cuda_step "$t" gpu; done
  # A GPU-only test with no host twin (it reruns itself in two processes).
  run_test cuda_step algorithm_record_is_reused_across_processes gpu
  for t in "${error_tests[@]}"; do run_test conv_error "$t" gpu; done
  # NCCL at world size 1 (a job of one rank) equals the plain single-GPU step.
  run_test data_parallel nccl_at_world_size_one_gpu gpu
  # The test bodies every backend runs (PyTorch golden data, modes, finite differences).
  for bin in $BACKEND_TESTS; do
    mapfile -t backend_tests < <(list_tests "$bin" | grep '::gpu$')
    [ "${#backend_tests[@]}" -gt 0 ] || record "$bin (::gpu tests)" "FAILED ($bin --list names no ::gpu test)" - 1
    for t in "${backend_tests[@]}"; do run_test "$bin" "$t" gpu; done
  done

  # NVRTC (needs no GPU): the kernels compile, nvcc's PTX is complete; one op with NVRTC's PTX.
  for t in "${nvrtc_tests[@]}"; do
    run_test nvrtc "$t" "" DENSENET_REQUIRE_NVRTC=1 DENSENET_REQUIRE_PTX=1
  done
  [ -z "$first_op" ] || check "cuda_ops $first_op, NVRTC" "test gpu" 120 env DENSENET_FORCE_NVRTC=1 \
    "$CARRY/cuda_ops" --exact "$first_op" --nocapture --test-threads=1

  local cs tool
  if cs=$(find_sanitizer); then
    for tool in memcheck racecheck; do
      check "compute-sanitizer $tool" gpu 180 "$cs" --tool "$tool" --error-exitcode 1 "${preflight[@]}" --no-graphs
    done
  else
    say "-- compute-sanitizer: skipped: not installed (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
    record compute-sanitizer "skipped: not installed" - 0
  fi

  imagenet_benchmarks
  compiled_torch

  report | tee "$OUT/table.txt"
  return "${PIPESTATUS[0]}"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *)
    echo "usage: bash scripts/gpu-check.sh prepare   (build machine)  |  bash scripts/gpu-check.sh run   (GPU machine)" >&2
    exit 2
    ;;
esac

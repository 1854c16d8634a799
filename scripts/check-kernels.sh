#!/usr/bin/env bash
# Compiles the kernels to machine code for sm_80 and sm_90 with ptxas' report, and fails on any
# error, any warning, or any register spill. No GPU needed.
#
#   scripts/check-kernels.sh NVCC [KERNELS_CU]
#
# KERNELS_CU is the one translation unit build.rs writes ($OUT_DIR/kernels.cu: kernels/dn.cuh
# and kernels/*.cu concatenated). Without it, `cargo build --release --lib` is run (with the
# caller's environment, so CI's later `cargo test --release` reuses it) and its build script's
# output is used: the same source the crate embeds, never a second concatenation.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=${1:?usage: scripts/check-kernels.sh NVCC [KERNELS_CU]}
cu=${2:-}
"$nvcc" --version | tail -n 2
if [ -z "$cu" ]; then
  out_dir=$(cargo build --release --lib --message-format=json | python3 -c '
import json, sys
dirs = [m["out_dir"] for m in map(json.loads, sys.stdin)
        if m.get("reason") == "build-script-executed" and "densenet" in m["package_id"]]
print(dirs[-1] if dirs else "")')
  if [ -z "$out_dir" ]; then
    echo "error: cargo did not report the densenet build script's OUT_DIR" >&2
    exit 1
  fi
  cu="$out_dir/kernels.cu"
fi
[ -f "$cu" ] || { echo "error: $cu does not exist" >&2; exit 1; }
echo "kernels: $cu ($(grep -c '__global__' "$cu") __global__ functions)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for arch in 80 90; do
  log="$tmp/sm_$arch.log"
  if ! "$nvcc" -cubin -arch="sm_$arch" -O3 --std=c++17 -Xptxas -v -o "$tmp/sm_$arch.cubin" "$cu" >"$log" 2>&1; then
    echo "FAIL sm_$arch: nvcc failed:"
    grep -v '^ptxas info' "$log" | sed 's/^/  /'
    status=1
    continue
  fi
  # One line per kernel: registers, stack frame, spills.
  awk -v arch="sm_$arch" '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']*'"'"'/); k = substr($0, RSTART + 1, RLENGTH - 2) }
    /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
    /Used [0-9]+ registers/ && k != "" {
      match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
      printf "  %s %-28s %4s registers, %s bytes stack, %s/%s bytes spilled (stores/loads)\n", arch, k, regs, stack, st, ld
      k = ""
    }' "$log"
  if grep -qi 'warning' "$log"; then
    echo "FAIL sm_$arch: warnings:"
    grep -i 'warning' "$log" | sed 's/^/  /'
    status=1
  fi
  if grep -Eq '[1-9][0-9]* bytes spill (stores|loads)' "$log"; then
    echo "FAIL sm_$arch: register spills:"
    grep -B2 -E '[1-9][0-9]* bytes spill (stores|loads)' "$log" | sed 's/^/  /'
    status=1
  fi
done
if [ "$status" -eq 0 ]; then
  echo "kernels OK: sm_80 and sm_90, no warnings, no spills"
fi
exit "$status"

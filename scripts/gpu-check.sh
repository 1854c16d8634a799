#!/usr/bin/env bash
# Every GPU check of the project, in one call of a few minutes on the lent GPU machine (see
# DEVELOPERS.md and /work/.library/device/README.md). Run there from the repository root:
#   bash scripts/gpu-check.sh
# Today (before the CUDA backend) it measures the PyTorch reference on the GPU: the baseline the
# CUDA backend's targets are stated against. It prints one JSON line per run and a table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
out=$(mktemp)
for net in "100 12" "190 40"; do
  set -- $net
  for mode in naive checkpointed; do
    timeout 240 "$PY" benches/torch_densenet.py gpu --mode "$mode" --depth "$1" --growth "$2" --batch 64 | tee -a "$out"
  done
done
"$PY" - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"\n{'model':<20}{'mode':<14}{'images/s':>10}{'step ms':>10}{'peak MiB':>10}")
for r in rows:
    name = f"BC-{r['depth']}-{r['growth']}"
    print(f"{name:<20}{r['mode']:<14}{r['images_per_s']:>10.0f}{1000*r['median_step_s']:>10.1f}"
          f"{r['max_memory_allocated_bytes']/2**20:>10.0f}")
PY

#!/usr/bin/env bash
# Speed of this working tree against an earlier revision, measured in one run (alternating, so the
# machine's load affects both alike): whole-process wall time of a 30-iteration quick blind training
# and of two deconvolve() calls on a 64x128x128 volume with the full-size generator (float32).
#   bash scripts/speed_vs_revision.sh REV DATASET_DIR [REPEATS]
# Each side imports its own bundle/ (python -S with site-packages on PYTHONPATH skips the editable
# install). Prints one line per run and the median ratios old/new (> 1: this tree is faster).
set -euo pipefail
rev=${1:?revision}; data=${2:?dataset_dir (python -m monai.bundle run simulate ...)}; reps=${3:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d); trap 'git -C "$root" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$root" worktree add -q "$work/old" "$rev"
sp=$(python -c "import site; print(site.getsitepackages()[0])")
infer='import numpy as np, torch
from bundle.inference import deconvolve
from bundle.networks import DeblurUNet
torch.manual_seed(0); net = DeblurUNet(features=(16, 16, 32, 64, 128, 16)).eval()
v = np.random.default_rng(0).random((64, 128, 128), dtype=np.float32)
for _ in range(2): deconvolve(v, net, progress=False, precision="float32")'
now() { python -c 'import time; print(time.perf_counter())'; }
for rep in $(seq "$reps"); do
  for side in old new; do
    tree=$([ "$side" = old ] && echo "$work/old" || echo "$root")
    cd "$tree"
    t0=$(date +%s.%N)
    OMP_NUM_THREADS=1 PYTHONPATH="$tree:$sp" python -S -m monai.bundle run training \
      --config_file "['configs/common.json','configs/train.json','configs/quick.json']" --dataset_dir "$data" \
      --ckpt_dir "$work/ck_${side}_$rep" --output_dir "$work/out_${side}_$rep" --max_epochs 1 --epoch_length 30 \
      --val_interval 100 > "$work/train_${side}_$rep.log" 2>&1
    t1=$(date +%s.%N)
    OMP_NUM_THREADS=1 PYTHONPATH="$tree:$sp" python -S -c "$infer" > "$work/infer_${side}_$rep.log" 2>&1
    t2=$(date +%s.%N)
    echo "$rep $side train_s $(echo "$t1 - $t0" | bc) infer_s $(echo "$t2 - $t1" | bc)" | tee -a "$work/times.txt"
  done
done
python - "$work/times.txt" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
t = {(r[1], k): [] for r in rows for k in ("train_s", "infer_s")}
for r in rows:
    t[(r[1], "train_s")].append(float(r[3])); t[(r[1], "infer_s")].append(float(r[5]))
for k in ("train_s", "infer_s"):
    old, new = statistics.median(t[("old", k)]), statistics.median(t[("new", k)])
    print(f"{k}: old {old:.1f} s, new {new:.1f} s, speed ratio old/new {old / new:.3f}")
PY

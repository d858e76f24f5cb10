#!/usr/bin/env bash
# GPU benchmark in one go: bf16 base (fp32 adapters, autocast), a LLaMA-7B-wide model cut to
# 4 layers, batch 4 x 1024. Run from the repository root on a CUDA machine:
#     bash benchmarks/gpu_bench.sh            # figures go to $OUT (or benchmarks/gpu_results)
# The machine may be offline: nothing is downloaded; the project is installed without its
# dependencies (torch, transformers, peft must already be there; peft is skipped if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/gpu_results}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python}"
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD:${PYTHONPATH:-}"
"$PY" -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'transformers', transformers.__version__)" \
  | tee "$OUT_DIR/machine.txt"
"$PY" -c "import peft; print('peft', peft.__version__)" 2>/dev/null | tee -a "$OUT_DIR/machine.txt" || echo "peft missing: skipped" | tee -a "$OUT_DIR/machine.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT_DIR/machine.txt" || true

SIZE=(--device cuda --dtype bf16 --hidden 4096 --intermediate 11008 --heads 32 --vocab 32000 --layers 4 --batch 4 --seq 1024)
set +e  # one failing benchmark must not stop the others
cd benchmarks
filter() { grep -v -i warn | tee "$1"; }
timeout 360 "$PY" bench_train.py "${SIZE[@]}" --steps 30 --warmup 5 --with-plain --json "$OUT_DIR/train.json" 2>&1 | filter "$OUT_DIR/train.txt"
timeout 120 "$PY" bench_infer.py "${SIZE[@]}" --steps 30 --warmup 5 2>&1 | filter "$OUT_DIR/infer.txt"
timeout 120 "$PY" bench_merge.py "${SIZE[@]}" --repeats 1 2>&1 | filter "$OUT_DIR/merge.txt"

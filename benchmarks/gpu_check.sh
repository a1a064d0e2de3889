#!/usr/bin/env bash
# The GPU path, checked in one short run on a machine with an NVIDIA GPU (and loratune installed:
# `pip install -e '.[quantization]'`): a 4-trial study with workers that keep the model loaded, in bf16
# and in fp16 with loss scaling, with 4-bit loading if bitsandbytes is installed, with two workers on
# two GPUs if there are two, printing each trial's peak GPU memory and the memory a worker holds after
# each trial (it must stay flat). Then packed trials (benchmarks/packing.py): K = 1, 4, 8 trials on one
# loaded base, in bf16 and in 4-bit, each against the same trials alone. The model is the offline demo
# model (built here, no network).
#
#   bash benchmarks/gpu_check.sh            # about 2-4 minutes; writes under ${OUT:-/tmp}/loratune-gpu-check
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export LORATUNE_GPU_CHECK_DIR="${OUT:-/tmp}/loratune-gpu-check"
rm -rf "$LORATUNE_GPU_CHECK_DIR"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
PYTHONUNBUFFERED=1 "$PY" - <<'PYTHON'
import importlib.util
import os
import torch
from loratune import run_optimization

root = os.environ["LORATUNE_GPU_CHECK_DIR"]
gpus = torch.cuda.device_count()
runs = [("bf16", {"training": {"precision": "bf16"}}), ("fp16 (loss scaling)", {"training": {"precision": "fp16"}})]
if importlib.util.find_spec("bitsandbytes"):
    runs.append(("4-bit, bf16", {"training": {"precision": "bf16"}, "model": {"quantization": "4bit"}}))
else:
    print("bitsandbytes is not installed: 4-bit loading not checked")
if gpus >= 2:
    runs.append(("2 workers, bf16", {"training": {"precision": "bf16"}, "workers": 2}))
else:
    print(f"{gpus} GPU: GPU assignment to two workers not checked")
print(f"{'run':<22} {'trial':>5} {'state':<10} {'loss':>8} {'GPUs':>5} {'peak GB':>8} {'after GB':>9} {'s':>6}")
for name, settings in runs:
    training = {"epochs": 0.5, **settings.pop("training")}
    results = run_optimization(num_trials=4, output_dir=f"{root}/{name.split()[0]}", quiet=True, report=False,
                               training=training, reuse_model=True, **settings)
    for t in results["trials"]:
        m, x = t["metrics"], t.get("extra") or {}
        after = (x.get("memory_after") or {}).get("cuda_allocated_gb", float("nan"))
        print(f"{name:<22} {t['index']:>5} {t['state']:<10} {m.get('loss', float('nan')):>8.4f} {str(x.get('gpus')):>5} "
              f"{m.get('peak_memory_gb', float('nan')):>8.3f} {after:>9.3f} {t['duration_s'] or 0:>6.1f}")
        assert t["state"] == "completed" and x.get("device") == "cuda", t.get("reason")
PYTHON
echo "packed trials against the same trials alone (benchmarks/packing.py), bf16:"
"$PY" benchmarks/packing.py --ks 1,4,8 --epochs 0.5 --precision bf16
if "$PY" -c "import bitsandbytes" 2>/dev/null; then
  echo "packed trials, 4-bit base, bf16:"
  "$PY" benchmarks/packing.py --ks 1,4,8 --epochs 0.5 --precision bf16 --quantization 4bit
fi

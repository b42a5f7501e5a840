#!/usr/bin/env bash
# GPU throughput check (issue 6): train_throughput with bf16-mixed on one GPU, MFU against a
# bf16 matmul peak measured on the same GPU in the same run. Goal: MFU >= 40% on an H100/H200.
# Prepared to fit one short device call (~5 min); not yet run (no GPU was lent when written).
#   bash benchmarks/gpu_check.sh [MODEL_DIR] [RENDERED_DIR]
set -euo pipefail
MODEL=${1:-models/base}
RENDERED=${2:-data/rendered}
python - <<'PY'
import time, torch
assert torch.cuda.is_available(), "no GPU visible"
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): a @ b
torch.cuda.synchronize(); peak = 20 * 2 * n**3 / (time.perf_counter() - t)
print(f"{torch.cuda.get_device_name()}: measured bf16 matmul peak {peak/1e12:.0f} TFLOP/s")
open("/tmp/gpu_peak_flops", "w").write(str(peak))
PY
# Our Lightning loop only (TRL's CPU comparison is the CPU benchmark's job); packed rows use
# per-document SDPA here too (flash-attn varlen is used if installed: attn_implementation=flash_attention_2).
python benchmarks/train_throughput.py --model "$MODEL" --rendered "$RENDERED" \
  --cases ours_dynamic,ours_packed --methods lora,full --batch-size 16 --warmup 3 --steps 10 \
  --accelerator gpu --precision bf16-mixed --peak-flops "$(cat /tmp/gpu_peak_flops)"

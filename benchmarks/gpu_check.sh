#!/usr/bin/env bash
# GPU throughput check (issue 6): train_throughput with bf16-mixed on one GPU, MFU against a
# bf16 matmul peak measured on the same GPU in the same run. Goal: MFU >= 40% on an H100/H200.
#   bash benchmarks/gpu_check.sh [MODEL_DIR] [RENDERED_DIR] [BATCH_SIZES]
# MODEL_DIR without model.safetensors (e.g. config + tokenizer only, when the 540 MB checkpoint
# cannot travel to the GPU machine) gets random weights from its config: throughput depends on
# the architecture and the token counts, not on the weights' values.
set -euo pipefail
MODEL=${1:-models/base}
RENDERED=${2:-data/rendered}
BATCHES=${3:-16,256}
if [ ! -f "$MODEL/model.safetensors" ]; then
  ${PYTHON:-python} - "$MODEL" <<'PY'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path("/tmp/gpu_check_model")
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32).save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json" and f.is_file():
        shutil.copy(f, dst / f.name)
print(f"random-initialized {src} architecture -> {dst}")
PY
  MODEL=/tmp/gpu_check_model
fi
${PYTHON:-python} - <<'PY'
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
# Packed rows on CUDA take PyTorch's flash varlen kernel (torch.nn.attention.varlen): check it
# against an explicit block-causal mask, values and gradients, before timing it.
${PYTHON:-python} -m pytest -q -p no:cacheprovider tests/test_packing.py -k block_causal \
  || echo "packed attention check FAILED (or pytest/hypothesis missing): do not trust the packed figures"
# Our Lightning loop only (TRL's comparison is the CPU benchmark's job): the defaults (auto), then
# each batching mode forced.
# --profile: one more step per case, profiled (GPU time per operator next to the CPU time that
# launched it), written under $OUT/profiles (the device tool brings $OUT back).
for B in ${BATCHES//,/ }; do
  ${PYTHON:-python} benchmarks/train_throughput.py --model "$MODEL" --rendered "$RENDERED" \
    --cases ours_default,ours_dynamic,ours_length_grouped,ours_packed --methods lora,full --batch-size "$B" --warmup 3 --steps 10 \
    --accelerator gpu --precision bf16-mixed --peak-flops "$(cat /tmp/gpu_peak_flops)" \
    --profile "${OUT:-/tmp/gpu_check}/profiles/batch$B"
done
# trainer.compile (torch.compile of the decoder) on the largest batch, when COMPILE=1.
if [ -n "${COMPILE:-}" ]; then
  ${PYTHON:-python} benchmarks/train_throughput.py --model "$MODEL" --rendered "$RENDERED" \
    --cases ours_length_grouped --methods lora,full --batch-size "$B" --warmup 3 --steps 10 --compile \
    --accelerator gpu --precision bf16-mixed --peak-flops "$(cat /tmp/gpu_peak_flops)"
fi

#!/usr/bin/env bash
# Round-9 stages (#15): does compiled LoRA with adapter dropout train like eager on the GPU? Files go to $OUT.
# Needs the carried wheels first.
#   bash benchmarks/run_round9.sh probe     # tiny Qwen2.5-VL, bf16: loss curves eager / compiled / fallback_random / GC,
#                                           # dropout 0.05 (probe_lora_compile.py PROBE=train)
#   bash benchmarks/run_round9.sh grads     # the gradient probe with dropout 0.05 (norms only)
#   bash benchmarks/run_round9.sh lora7b0   # Qwen2.5-VL-7B LoRA, dropout 0: HF-default vs compiled vltrain (losses checked)
#   bash benchmarks/run_round9.sh lora7bfr  # the same with dropout 0.05 and inductor's fallback_random
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
B="python benchmarks/bench_sft.py --steps 3 --warmup 1 --num_samples 16 --preset qwen2_5_vl_7b"
show() { grep -Ev '\[transformers\]|Warning|warn' | grep -E "card|tok/s|OOM|rror|WARNING|loss drop|grad norm"; }
while [ $# -gt 0 ]; do stage=$1; shift; case "$stage" in
probe) PROBE=train LORA_DROPOUT=0.05 STEPS=8 LR=1e-3 timeout 200 python benchmarks/probe_lora_compile.py \
         2>&1 | tee "$OUT/r9_probe_train.txt" | show ;;
grads) LORA_DROPOUT=0.05 timeout 150 python benchmarks/probe_lora_compile.py 2>&1 | tee "$OUT/r9_probe_grads.txt" | show ;;
lora7b0) timeout 400 $B --lora_dropout 0 --runs hf:lora:gc1@4,vltrain:lora:gc1c+compile_vision@32768,vltrain:lora:gc2c+compile_vision@16384 \
           --out "$OUT/r9_lora_7b_dropout0.json" 2>&1 | show ;;
lora7bfr) timeout 300 $B --lora_dropout 0.05 --fallback_random --runs hf:lora:gc1@4,vltrain:lora:gc1c+compile_vision@32768 \
            --out "$OUT/r9_lora_7b_fallback_random.json" 2>&1 | show ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac; done

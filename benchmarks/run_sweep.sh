#!/usr/bin/env bash
# Profile + gradient-checkpointing / token-budget sweep (second round of RESULTS.md), each stage timed out.
#   bash benchmarks/run_sweep.sh 3b     # Qwen2.5-VL-3B full FT: profile, HF baseline and vltrain variants
#   bash benchmarks/run_sweep.sh 7b     # Qwen2.5-VL-7B LoRA: HF baseline and vltrain variants
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
B="python benchmarks/bench_sft.py"
F='\[transformers\]|Warning|warn'
case "${1:-3b}" in
3b)
  timeout 260 $B --preset qwen2_5_vl_3b --runs vltrain:full:gc1,hf:full:gc1,vltrain:full:gc2,vltrain:full:gc3 \
      --hf_micro_batch 4 --token_budget 16384 --steps 2 --profile "$OUT/profile_3b_gc1_16k.txt" \
      --out "$OUT/sweep_3b_16k.json" 2>&1 | grep -Ev "$F" | grep -E "tok/s|OOM|Error|error|Name|aten|vltrain|flash|varlen|gemm|Self CUDA" | head -60
  timeout 200 $B --preset qwen2_5_vl_3b --runs vltrain:full:gc1,vltrain:full:gc2,vltrain:full:gc4 \
      --token_budget 32768 --steps 2 --out "$OUT/sweep_3b_32k.json" 2>&1 | grep -Ev "$F" | grep -E "tok/s|OOM|rror" ;;
7b)
  timeout 420 $B --preset qwen2_5_vl_7b --runs hf:lora:gc1,vltrain:lora:gc1,vltrain:lora:gc2,vltrain:lora:gc0 \
      --hf_micro_batch 4 --token_budget 32768 --steps 2 --out "$OUT/sweep_7b_lora.json" 2>&1 | grep -Ev "$F" | grep -E "tok/s|OOM|rror" ;;
esac

#!/usr/bin/env bash
# Round-2 benchmark stages (RESULTS.md "Round 2"), each run under `timeout`; JSON and profile go to $OUT.
#   bash benchmarks/run_sweep.sh 3b     # Qwen2.5-VL-3B full FT: HF + vltrain at 16k (vltrain profiled), vltrain at 32k
#   bash benchmarks/run_sweep.sh 7b     # Qwen2.5-VL-7B LoRA: HF baseline + vltrain gc1 at 32k, vltrain gc0 at 4k
#   bash benchmarks/run_sweep.sh q3     # Qwen3-VL-4B full FT: HF baseline + vltrain gc1 at 32k
#   bash benchmarks/run_sweep.sh 3b32   # Qwen2.5-VL-3B full FT: HF baseline + vltrain gc1 at 32k, one process
# Partial checkpointing (gc2/gc3/gc4) is not run: at 16k tokens each non-checkpointed 3B layer costs
# ~2.5 GiB and every such variant ran out of memory in the first sweep (results/sweep_3b_*.json).
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
B="python benchmarks/bench_sft.py"
F='\[transformers\]|Warning|warn'
case "${1:-3b}" in
3b)
  timeout 270 $B --preset qwen2_5_vl_3b --runs hf:full:gc1,vltrain:full:gc1 \
      --hf_micro_batch 4 --token_budget 16384 --steps 2 --profile "$OUT/profile_3b_gc1_16k_r2.txt" \
      --out "$OUT/sweep_3b_16k_r2.json" 2>&1 | grep -Ev "$F" | grep -E "card|tok/s|OOM|Error|error|Name|aten|Liger|liger|_rms|swiglu|varlen|Self CUDA" | head -60
  timeout 130 $B --preset qwen2_5_vl_3b --runs vltrain:full:gc1 \
      --token_budget 32768 --steps 2 --out "$OUT/sweep_3b_32k_r2.json" 2>&1 | grep -Ev "$F" | grep -E "card|tok/s|OOM|rror" ;;
7b)
  # gc2 is not run (at 32k tokens a non-checkpointed 7B layer holds ~9 GiB); gc0 only fits small micro-batches
  timeout 180 $B --preset qwen2_5_vl_7b --runs hf:lora:gc1,vltrain:lora:gc1 \
      --hf_micro_batch 4 --token_budget 32768 --steps 2 --out "$OUT/sweep_7b_lora_r2.json" 2>&1 | grep -Ev "$F" | grep -E "card|tok/s|OOM|rror"
  timeout 80 $B --preset qwen2_5_vl_7b --runs vltrain:lora:gc0 \
      --token_budget 4096 --steps 2 --out "$OUT/sweep_7b_lora_gc0_r2.json" 2>&1 | grep -Ev "$F" | grep -E "card|tok/s|OOM|rror" ;;
q3)
  timeout 140 $B --preset qwen3_vl_4b --runs hf:full:gc1,vltrain:full:gc1 \
      --hf_micro_batch 4 --token_budget 32768 --steps 2 --out "$OUT/q3vl_4b_gc1_32k_r2.json" 2>&1 | grep -Ev "$F" | grep -E "card|tok/s|OOM|rror" ;;
3b32)
  timeout 110 $B --preset qwen2_5_vl_3b --runs hf:full:gc1,vltrain:full:gc1 \
      --hf_micro_batch 4 --token_budget 32768 --steps 2 --out "$OUT/sweep_3b_32k_hf_r2.json" 2>&1 | grep -Ev "$F" | grep -E "card|tok/s|OOM|rror" ;;
esac

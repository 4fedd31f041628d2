#!/usr/bin/env bash
# Round-3 benchmark stages (RESULTS.md "Round 3"), each under `timeout`; JSON goes to $OUT.
# (Calls 1 and 3 of round 3 also timed selective checkpointing and "last K layers not checkpointed", which
# were then removed for giving nothing; their commands, at commit 23a4ca3 / cc276be, are in RESULTS.md.)
#   bash benchmarks/run_round3.sh 3b      # Qwen2.5-VL-3B full FT, GC on: HF vs vltrain eager / compile_layers
#   bash benchmarks/run_round3.sh 3b_prof # Qwen2.5-VL-3B: profile of one 32k step
#   bash benchmarks/run_round3.sh 7b      # Qwen2.5-VL-7B LoRA: HF vs vltrain eager / compile_layers, GC off / on
#   bash benchmarks/run_round3.sh q2      # Qwen2-VL-2B: full / LoRA x GC on / off, both paths (+ compile_layers)
#   bash benchmarks/run_round3.sh q35     # Qwen3.5-4B: the same (before the linear-attention fix)
#   bash benchmarks/run_round3.sh q35b    # Qwen3.5-4B after it (padded batches per layer, cache off)
source "$(dirname "$0")/stages.sh"
B="python benchmarks/bench_sft.py --steps 2"
case "${1:-3b}" in
3b) timeout 420 $B --preset qwen2_5_vl_3b --out "$OUT/r3_3b_compile.json" --runs \
      hf:full:gc1@4,vltrain:full:gc1@32768,vltrain:full:gc1c@32768,vltrain:full:gc1cx@32768 2>&1 | show ;;
3b_prof) timeout 100 $B --preset qwen2_5_vl_3b --runs vltrain:full:gc1@32768 --profile "$OUT/profile_3b_gc1_32k_r3.txt" \
      --out "$OUT/r3_3b_prof.json" 2>&1 | show ;;
7b) timeout 330 $B --preset qwen2_5_vl_7b --out "$OUT/r3_7b_lora.json" --runs \
      hf:lora:gc1@4,vltrain:lora:gc0@4096,vltrain:lora:gc0c@4096,vltrain:lora:gc1@32768,vltrain:lora:gc1c@32768 2>&1 | show ;;
q2) timeout 420 $B --preset qwen2_vl_2b --out "$OUT/r3_q2_2b.json" --runs \
      hf:full:gc1@4,vltrain:full:gc1@32768,vltrain:full:gc1c@32768,hf:full:gc0@1,vltrain:full:gc0@4096,hf:lora:gc1@4,vltrain:lora:gc1c@32768,hf:lora:gc0@1,vltrain:lora:gc0c@4096 2>&1 | show ;;
q35) timeout 540 $B --preset qwen3_5_4b --out "$OUT/r3_q35_4b.json" --runs \
      hf:full:gc1@4,vltrain:full:gc1@32768,vltrain:full:gc1c@32768,hf:lora:gc1@4,vltrain:lora:gc1c@32768,hf:full:gc0@1,vltrain:full:gc0@4096,hf:lora:gc0@1,vltrain:lora:gc0c@4096 2>&1 | show ;;
q35b) timeout 400 $B --preset qwen3_5_4b --out "$OUT/r3_q35_4b_b.json" --runs \
      hf:full:gc1@4,vltrain:full:gc1@32768,vltrain:full:gc0@4096,hf:lora:gc1@4,vltrain:lora:gc1c@32768,vltrain:lora:gc0c@4096 2>&1 | show ;;
esac

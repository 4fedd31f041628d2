#!/usr/bin/env bash
# Round-4 benchmark stages (RESULTS.md "Round 4"), each under `timeout`; JSON goes to $OUT.
#   bash benchmarks/run_round4.sh sync     # Qwen2.5-VL-3B, one 32k step: device->host syncs by source line
#   bash benchmarks/run_round4.sh 3b_lora  # Qwen2.5-VL-3B LoRA: HF vs vltrain, GC on / off
#   bash benchmarks/run_round4.sh q3       # Qwen3-VL-4B: LoRA GC on, full GC off
#   bash benchmarks/run_round4.sh 3b       # Qwen2.5-VL-3B full FT, GC on, after the aligned vision MLP
#   bash benchmarks/run_round4.sh 3b_prof  # its profile (one 32k step)
#   bash benchmarks/run_round4.sh gc0      # GC-off cells: Qwen2.5-VL-3B LoRA, Qwen3-VL-4B full
#   bash benchmarks/run_round4.sh todo     # the cells not timed yet (device budget): 7B full FT, LoRA GC off
#                                          # for 3B and Qwen3-VL-4B, and the 3B profile after the aligned MLP
#   bash benchmarks/run_round4.sh q35_fla  # Qwen3.5-4B with flash-linear-attention installed (both paths use it)
SHOW_EXTRA='^ +[0-9]+ '
source "$(dirname "$0")/stages.sh"
B="python benchmarks/bench_sft.py --steps 2"
for stage in "$@"; do case "$stage" in
sync) timeout 120 python benchmarks/bench_sft.py --steps 1 --preset qwen2_5_vl_3b --runs vltrain:full:gc1@32768 \
      --sync_report "$OUT/sync_3b_32k.txt" --out "$OUT/r4_sync.json" 2>&1 | show ;;
3b_lora) timeout 270 $B --preset qwen2_5_vl_3b --out "$OUT/r4_3b_lora.json" --runs \
      hf:lora:gc1@4,vltrain:lora:gc1@32768,vltrain:lora:gc1c@32768,hf:lora:gc0@1,vltrain:lora:gc0c@4096 2>&1 | show ;;
q3) timeout 200 $B --preset qwen3_vl_4b --out "$OUT/r4_q3_4b.json" --runs \
      hf:lora:gc1@4,vltrain:lora:gc1c@32768,hf:full:gc0@1,vltrain:full:gc0@4096 2>&1 | show ;;
3b) timeout 200 $B --preset qwen2_5_vl_3b --out "$OUT/r4_3b.json" --runs \
      hf:full:gc1@4,vltrain:full:gc1@32768 2>&1 | show ;;
3b_prof) timeout 100 $B --preset qwen2_5_vl_3b --runs vltrain:full:gc1@32768 --profile "$OUT/profile_3b_gc1_32k_r4.txt" \
      --out "$OUT/r4_3b_prof.json" 2>&1 | show ;;
q35_fla) timeout 330 $B --preset qwen3_5_4b --out "$OUT/r4_q35_fla.json" --runs \
      hf:full:gc1@4,vltrain:full:gc1@32768,hf:lora:gc1@4,vltrain:lora:gc1c@32768 2>&1 | show ;;
gc0) timeout 170 $B --preset qwen2_5_vl_3b --out "$OUT/r4_3b_lora_gc0.json" --runs \
      hf:lora:gc0@1,vltrain:lora:gc0c@4096 2>&1 | show
    timeout 130 $B --preset qwen3_vl_4b --out "$OUT/r4_q3_gc0.json" --runs \
      hf:full:gc0@1,vltrain:full:gc0@4096 2>&1 | show ;;
todo) timeout 150 $B --preset qwen2_5_vl_3b --out "$OUT/r4_3b_lora_gc0_b.json" --runs vltrain:lora:gc0c@4096 2>&1 | show
    timeout 200 $B --preset qwen3_vl_4b --out "$OUT/r4_q3_lora_gc0.json" --runs hf:lora:gc0@1,vltrain:lora:gc0c@4096 2>&1 | show
    timeout 240 $B --preset qwen2_5_vl_7b --out "$OUT/r4_7b_full.json" --runs hf:full:gc1@4,vltrain:full:gc1@32768 2>&1 | show
    bash "$0" 3b_prof ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac; done

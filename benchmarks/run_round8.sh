#!/usr/bin/env bash
# Round-8 stages (#15), each under a time limit; files go to $OUT. Needs the carried wheels first.
#   bash benchmarks/run_round8.sh gputests  # the GPU tests not re-run since the attention-backend cache:
#                                           # vision_varlen, vision_positions, kernels, packing, the benchmark loop test
#   bash benchmarks/run_round8.sh lora7b    # Qwen2.5-VL-7B LoRA, GC on: HF-default vs vltrain (compile_layers +
#                                           # compile_vision), every layer / every 2nd / every 3rd checkpointed
#   bash benchmarks/run_round8.sh q3        # Qwen3-VL-4B full FT near HF's peak memory: a larger token budget with
#                                           # every layer checkpointed, every 2nd layer at 10,240 tokens
#   bash benchmarks/run_round8.sh loopmp    # Qwen2.5-VL-3B: the hand-written step and loops.sft.train without autocast
#                                           # (the bf16 model as the hand-written step runs it), same process
SHOW_EXTRA='split|GPU busy|^  [a-z]|syncs|^ +[0-9]+  /'
source "$(dirname "$0")/stages.sh"
B="python benchmarks/bench_sft.py --steps 3 --warmup 1 --num_samples 16"
while [ $# -gt 0 ]; do stage=$1; shift; case "$stage" in
gputests) timeout 300 python -m pytest -q -m gpu tests/test_vision_varlen.py tests/test_vision_positions.py tests/test_kernels.py tests/test_packing.py tests/test_bench.py \
            -p no:cacheprovider > "$OUT/gputests.log" 2>&1; grep -E "passed|failed|FAILED|Error" "$OUT/gputests.log" | tail -20 ;;
lora7b) timeout 560 $B --preset qwen2_5_vl_7b --runs hf:lora:gc1@4,vltrain:lora:gc1c+compile_vision@16384,vltrain:lora:gc2c+compile_vision@16384,vltrain:lora:gc3c+compile_vision@16384 \
          --out "$OUT/r8_lora_7b.json" 2>&1 | show ;;
q3) timeout 500 $B --preset qwen3_vl_4b --runs hf:full:gc1@4,vltrain:full:gc1c+compile_vision@32768,vltrain:full:gc2c+compile_vision@10240 \
      --out "$OUT/r8_q3.json" 2>&1 | show ;;
loopmp) timeout 240 $B --preset qwen2_5_vl_3b --runs vltrain:full:gc1@16384,loop:full:gc1@16384 --loop_epoch_steps 4 \
          --loop_mixed_precision no --out "$OUT/r8_loop_3b_no_autocast.json" 2>&1 | show ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac; done

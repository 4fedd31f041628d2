#!/usr/bin/env bash
# Round-7 stages (#15), each under a time limit; files go to $OUT. Needs the carried wheels first.
#   bash benchmarks/run_round7.sh gputests  # GPU tests: visual_merge (one tower call), compile_vision, compile_layers
#   bash benchmarks/run_round7.sh loop3b    # Qwen2.5-VL-3B full FT, 4 steps per epoch: the hand-written step and
#                                           # loops.sft.train (one tower call), then the loop with two tower calls
#   bash benchmarks/run_round7.sh loopprof  # the same loop: one step cycle under torch.profiler, the next under the
#                                           # sync debug mode (files prof_loop_3b.loop.txt, sync_loop_3b.loop.txt)
#   bash benchmarks/run_round7.sh cv PRESET # HF-default vs vltrain without / with compile_vision, same process
SHOW_EXTRA='split|GPU busy|^  [a-z]|syncs|^ +[0-9]+  /'
source "$(dirname "$0")/stages.sh"
B="python benchmarks/bench_sft.py --steps 3 --warmup 1 --num_samples 16"
while [ $# -gt 0 ]; do stage=$1; shift; case "$stage" in
gputests) timeout 420 python -m pytest -q -m gpu tests/test_visual_merge.py tests/test_compile_layers.py \
            -p no:cacheprovider > "$OUT/gputests.log" 2>&1; grep -E "passed|failed|FAILED|Error" "$OUT/gputests.log" | tail -20 ;;
loop3b)
  timeout 240 $B --preset qwen2_5_vl_3b --runs vltrain:full:gc1@16384,loop:full:gc1@16384 --loop_epoch_steps 4 \
    --out "$OUT/r7_loop_3b.json" 2>&1 | show
  timeout 150 $B --preset qwen2_5_vl_3b --runs loop:full:gc1@16384 --loop_epoch_steps 4 --two_tower_calls \
    --out "$OUT/r7_loop_3b_two_calls.json" 2>&1 | show ;;
loopprof) timeout 180 $B --preset qwen2_5_vl_3b --runs loop:full:gc1@16384 --loop_epoch_steps 4 \
            --profile "$OUT/prof_loop_3b.txt" --sync_report "$OUT/sync_loop_3b.txt" \
            --out "$OUT/r7_loop_3b_prof.json" 2>&1 | show ;;
cv) p=$1; shift; timeout 400 $B --preset "$p" \
      --runs hf:full:gc1@4,vltrain:full:gc1@16384,vltrain:full:gc1+compile_vision@16384 --out "$OUT/r7_cv_$p.json" 2>&1 | show ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac; done

#!/usr/bin/env bash
# Round-6 stages (#15), each under a time limit; files go to $OUT. Needs the carried wheels first.
#   bash benchmarks/run_round6.sh probe     # which ops of the merge sync on CUDA (nonzero_static, index_copy, masked_scatter)
#   bash benchmarks/run_round6.sh gputests  # the GPU tests of visual_merge and float8
#   bash benchmarks/run_round6.sh ab PRESET # HF-default vs vltrain without / with visual_merge, same process
#   bash benchmarks/run_round6.sh loop3b    # Qwen2.5-VL-3B full FT: the hand-written step next to loops.sft.train
#   bash benchmarks/run_round6.sh varlen PRESET  # vltrain with torch's varlen_attn custom op vs the direct flash call
#   bash benchmarks/run_round6.sh loopdiag  # the 3B loop path: 8 workers, and py-spy's samples of the main process
#   bash benchmarks/run_round6.sh loopmp    # the 3B loop path with the bf16 model and no autocast, next to vltrain
#   bash benchmarks/run_round6.sh profq2    # one profiled step + the sync report, Qwen2-VL-2B full FT, GC on
#   bash benchmarks/run_round6.sh profq3    # the same for Qwen3-VL-4B (all kernels, visual_merge included)
#   bash benchmarks/run_round6.sh prof7l    # one profiled step, Qwen2.5-VL-7B LoRA with compile_layers
SHOW_EXTRA='^loop:|GPU busy|^  [a-z]|syncs|^ +[0-9]+  /'
source "$(dirname "$0")/stages.sh"
B="python benchmarks/bench_sft.py --steps 3 --warmup 1 --num_samples 16"
while [ $# -gt 0 ]; do stage=$1; shift; case "$stage" in
probe) timeout 60 python benchmarks/probe_merge_syncs.py 2>&1 | grep -v Warn | tail -8 ;;
gputests) timeout 300 python -m pytest -q -m gpu tests/test_visual_merge.py tests/test_float8.py tests/test_packing.py \
            -s -p no:cacheprovider > "$OUT/gputests.log" 2>&1; grep -E "syncs|passed|failed|FAILED" "$OUT/gputests.log" | tail -20 ;;
ab) p=$1; shift; timeout 300 $B --preset "$p" \
      --runs hf:full:gc1@4,vltrain:full:gc1-visual_merge@16384,vltrain:full:gc1@16384 --out "$OUT/r6_ab_$p.json" 2>&1 | show ;;
varlen) p=$1; shift; timeout 150 $B --preset "$p" --runs vltrain:full:gc1@16384 --torch_varlen \
          --out "$OUT/r6_torch_varlen_$p.json" 2>&1 | show ;;
loopdiag)
  timeout 200 $B --preset qwen2_5_vl_3b --runs loop:full:gc1@16384 --num_workers 8 --out "$OUT/r6_loop_3b_w8.json" 2>&1 | show
  $B --preset qwen2_5_vl_3b --runs loop:full:gc1@16384 --steps 8 --out "$OUT/r6_loop_3b_spy.json" > "$OUT/loop_spy.log" 2>&1 &
  pid=$!; sleep 38
  timeout 30 py-spy record --pid $pid --duration 12 --rate 40 --format raw --output "$OUT/loop_3b_main.folded" --nonblocking \
    > /dev/null 2>&1; wait $pid; show < "$OUT/loop_spy.log" ;;
loopmp) timeout 200 $B --preset qwen2_5_vl_3b --runs vltrain:full:gc1@16384,loop:full:gc1@16384 \
          --loop_mixed_precision no --out "$OUT/r6_loop_3b_no_autocast.json" 2>&1 | show ;;
loop3b) timeout 300 $B --preset qwen2_5_vl_3b --runs vltrain:full:gc1@16384,loop:full:gc1@16384 \
          --out "$OUT/r6_loop_3b.json" 2>&1 | show ;;
profq2) timeout 200 $B --preset qwen2_vl_2b --runs vltrain:full:gc1@16384 --profile "$OUT/prof_q2_2b.txt" \
          --sync_report "$OUT/sync_q2_2b.txt" --out "$OUT/r6_prof_q2_2b.json" 2>&1 | show ;;
profq3) timeout 200 $B --preset qwen3_vl_4b --runs vltrain:full:gc1@16384 --profile "$OUT/prof_q3_4b.txt" \
          --sync_report "$OUT/sync_q3_4b.txt" --out "$OUT/r6_prof_q3_4b.json" 2>&1 | show ;;
prof7l) timeout 300 python benchmarks/bench_sft.py --steps 2 --warmup 1 --num_samples 16 --preset qwen2_5_vl_7b \
          --runs vltrain:lora:gc1c@16384 --profile "$OUT/prof_7b_lora.txt" --out "$OUT/r6_prof_7b_lora.json" 2>&1 | show ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac; done

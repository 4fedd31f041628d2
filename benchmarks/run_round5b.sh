#!/usr/bin/env bash
# Round-5 stages, second part (#15), each under a time limit; files go to $OUT. Needs the carried wheels first.
#   bash benchmarks/run_round5b.sh hang    # the loop path on the tiny preset (2 and 0 workers); stacks if it stalls
#   bash benchmarks/run_round5b.sh data    # bench_data.py on this machine's cores vs 3B full SFT's consumption
#   bash benchmarks/run_round5b.sh profq3  # one profiled vltrain step + the sync report, Qwen3-VL-4B full FT, GC on
#   bash benchmarks/run_round5b.sh profq2  # the same for Qwen2-VL-2B
#   bash benchmarks/run_round5b.sh prof7l  # the same for Qwen2.5-VL-7B LoRA with compile_layers
#   bash benchmarks/run_round5b.sh vpos    # Qwen2.5-VL-3B / Qwen3-VL-4B full FT with and without vision_positions
#   bash benchmarks/run_round5b.sh fp8     # bench_fp8.py: bf16 vs float8 (+ compile_layers), 50-step loss agreement
#   bash benchmarks/run_round5b.sh gputests  # the GPU tests of vision_positions and float8
#   bash benchmarks/run_round5b.sh ratios  # HF-default vs vltrain (all: now with vision_positions), Qwen3-VL-4B and
#                                          # Qwen2-VL-2B full FT, same process: #15's ratio targets
# Measured 2026-12-02 (session 6): hang (fixed), data, profq3, vpos (qwen3_vl_4b only), fp8, gputests
# (vision_positions; float8's revised GPU test not re-run). Not yet run: profq2, prof7l, vpos for 3B, ratios.
SHOW_EXTRA='^loop:|GPU busy|^  [a-z]|syncs|^ +[0-9]+  /'
source "$(dirname "$0")/stages.sh"
B="python benchmarks/bench_sft.py --steps 3 --warmup 1 --num_samples 16"
# watch SECONDS LOG CMD...: run CMD; if it is still running after SECONDS, print every thread's stack of it and of
# its children (faulthandler on SIGUSR1, bench_sft.py registers it; py-spy when installed), then kill it.
watch() {
  local secs=$1 log=$2; shift 2
  "$@" >"$log" 2>&1 & local pid=$!
  for _ in $(seq "$secs"); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  if kill -0 $pid 2>/dev/null; then
    echo "STALLED after ${secs}s: $*"; local kids; kids=$(pgrep -P $pid | tr '\n' ' ')
    for p in $pid $kids; do echo "== py-spy $p"; py-spy dump --native --pid $p 2>&1 | head -60; done
    for p in $pid $kids; do kill -USR1 $p 2>/dev/null; done; sleep 3
    kill -9 $pid $kids 2>/dev/null
  fi
  wait $pid 2>/dev/null; echo "exit $? : $*"; grep -Ev 'Warning|warn' "$log" | tail -60
}
for stage in "$@"; do case "$stage" in
hang)
  watch 75 "$OUT/hang_w2.log" $B --preset tiny_qwen2_5_vl --runs loop:full:gc1 --steps 2
  watch 75 "$OUT/hang_w0.log" $B --preset tiny_qwen2_5_vl --runs loop:full:gc1 --steps 2 --num_workers 0 ;;
data) timeout 150 python benchmarks/bench_data.py --workers 0,2,4,8,16 --gpu_tokens_per_s 13034 \
        --out "$OUT/r5_data_h200.json" 2>&1 | grep -Ev 'Warning|warn' | tail -30 ;;
profq3) timeout 200 $B --preset qwen3_vl_4b --runs vltrain:full:gc1@16384 --profile "$OUT/prof_q3_4b.txt" \
          --sync_report "$OUT/sync_q3_4b.txt" --out "$OUT/r5_prof_q3_4b.json" 2>&1 | show ;;
profq2) timeout 200 $B --preset qwen2_vl_2b --runs vltrain:full:gc1@16384 --profile "$OUT/prof_q2_2b.txt" \
          --sync_report "$OUT/sync_q2_2b.txt" --out "$OUT/r5_prof_q2_2b.json" 2>&1 | show ;;
prof7l) timeout 300 $B --preset qwen2_5_vl_7b --runs vltrain:lora:gc1c@16384 --profile "$OUT/prof_7b_lora.txt" \
          --out "$OUT/r5_prof_7b_lora.json" 2>&1 | show ;;
vpos) for p in qwen2_5_vl_3b qwen3_vl_4b; do timeout 200 $B --preset $p \
        --runs vltrain:full:gc1@16384,vltrain:full:gc1+vision_positions@16384 --out "$OUT/r5_vpos_$p.json" 2>&1 | show; done ;;
fp8) timeout 300 python benchmarks/bench_fp8.py --preset qwen2_5_vl_3b --out "$OUT/r5_fp8_3b.json" 2>&1 \
       | grep -Ev 'Warning|warn' | tail -20 ;;
ratios) for p in qwen3_vl_4b qwen2_vl_2b; do timeout 240 $B --preset $p --runs hf:full:gc1@4,vltrain:full:gc1@16384 \
          --out "$OUT/r5_ratio_$p.json" 2>&1 | show; done ;;
gputests) timeout 300 python -m pytest -q -m gpu tests/test_vision_positions.py tests/test_float8.py -s -p no:cacheprovider \
            2>&1 | grep -Ev 'Warning|warn' | tail -30 ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac; done

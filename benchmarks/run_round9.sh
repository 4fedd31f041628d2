#!/usr/bin/env bash
# Round-9 stages (#15): does compiled LoRA with adapter dropout train like eager on the GPU? Files go to $OUT.
# Needs the carried wheels first.
#   bash benchmarks/run_round9.sh probe     # tiny Qwen2.5-VL, bf16: loss curves eager / compiled / fused casts / GC,
#                                           # dropout 0, lr 1e-5 (probe_lora_compile.py PROBE=train)
#   bash benchmarks/run_round9.sh grads     # the gradient probe with dropout 0.05 (norms only)
#   bash benchmarks/run_round9.sh lora7b0   # Qwen2.5-VL-7B LoRA, dropout 0: HF-default vs compiled vltrain (losses checked)
#   bash benchmarks/run_round9.sh lora7b05  # the same with dropout 0.05
#   bash benchmarks/run_round9.sh r3b       # Qwen2.5-VL-3B again with eager's rounding in the compiled code: full FT with
#                                           # compile_vision (round 7's 47.0% MFU), LoRA HF-default vs compile_layers
#   bash benchmarks/run_round9.sh r3bfull   # only the full FT run of r3b (round 7's 47.0% MFU)
#   bash benchmarks/run_round9.sh q3c       # Qwen3-VL-4B full FT, round 8's gc1c+compile_vision@32768 again (no HF row)
#   bash benchmarks/run_round9.sh gputests  # the compile_layers / compile_vision GPU tests (eager bf16 rounding)
SHOW_EXTRA='WARNING|loss drop|grad norm'
source "$(dirname "$0")/stages.sh"
B="python benchmarks/bench_sft.py --steps 3 --warmup 1 --num_samples 16 --preset qwen2_5_vl_7b"
while [ $# -gt 0 ]; do stage=$1; shift; case "$stage" in
probe) PROBE=train LORA_DROPOUT=0 STEPS=6 LR=1e-5 timeout 200 python benchmarks/probe_lora_compile.py \
         2>&1 | tee "$OUT/r9_probe_train.txt" | show ;;
grads) LORA_DROPOUT=0.05 timeout 150 python benchmarks/probe_lora_compile.py 2>&1 | tee "$OUT/r9_probe_grads.txt" | show ;;
lora7b0) timeout 330 $B --lora_dropout 0 --runs hf:lora:gc1@4,vltrain:lora:gc1c+compile_vision@32768,vltrain:lora:gc2c+compile_vision@16384 \
           --out "$OUT/r9_lora_7b_dropout0.json" 2>&1 | show ;;
lora7b05) timeout 240 $B --lora_dropout 0.05 --runs hf:lora:gc1@4,vltrain:lora:gc1c+compile_vision@32768 \
            --out "$OUT/r9_lora_7b_dropout005.json" 2>&1 | show ;;
r3b) timeout 250 python benchmarks/bench_sft.py --steps 3 --warmup 1 --num_samples 16 --preset qwen2_5_vl_3b \
       --runs vltrain:full:gc1+compile_vision@16384,hf:lora:gc1@4,vltrain:lora:gc1c+compile_vision@32768 \
       --out "$OUT/r9_3b.json" 2>&1 | show ;;
r3bfull) timeout 150 python benchmarks/bench_sft.py --steps 3 --warmup 1 --num_samples 16 --preset qwen2_5_vl_3b \
           --runs vltrain:full:gc1+compile_vision@16384 --out "$OUT/r9_3b_full.json" 2>&1 | show ;;
q3c) timeout 150 python benchmarks/bench_sft.py --steps 3 --warmup 1 --num_samples 16 --preset qwen3_vl_4b \
       --runs vltrain:full:gc1c+compile_vision@32768 --out "$OUT/r9_q3_compiled.json" 2>&1 | show ;;
gputests) timeout 200 python -m pytest -q -s -m gpu tests/test_compile_layers.py -p no:cacheprovider > "$OUT/r9_gputests.log" 2>&1
          grep -E "passed|failed|FAILED|Error|\{'eager'" "$OUT/r9_gputests.log" | tail -20 ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac; done

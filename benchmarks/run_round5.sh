#!/usr/bin/env bash
# Round-5 benchmark stages (#15 item 5: the benchmark measures train()), each under `timeout`; JSON goes to $OUT.
# Each stage runs, in ONE process, the HF-default path, vltrain's hand-written step and the real loop
# (loops.sft.train through build_model, SFTDataset, build_loader and the Accelerator: bench_sft.py's `loop` path),
# 16 samples, 1 warm-up + 3 timed steps. Needs the carried wheels installed first (transformers 5.24, liger-kernel,
# qwen-vl-utils, av: the loop path writes its video with PyAV). The loop path saves the preset (~7-9 GB) under
# $TMPDIR and deletes it afterwards.
#   bash benchmarks/run_round5.sh loop3b   # Qwen2.5-VL-3B full FT, GC on: hf@4, vltrain@16384, loop@16384
#   bash benchmarks/run_round5.sh loopq3   # Qwen3-VL-4B, the same three runs
SHOW_EXTRA='^kernels|^token budget|^steps:'
source "$(dirname "$0")/stages.sh"
B="python benchmarks/bench_sft.py --steps 3 --warmup 1 --num_samples 16"
RUNS=hf:full:gc1@4,vltrain:full:gc1@16384,loop:full:gc1@16384
for stage in "$@"; do case "$stage" in
loop3b) timeout 270 $B --preset qwen2_5_vl_3b --runs $RUNS --out "$OUT/r5_loop_3b.json" 2>&1 | show ;;
loopq3) timeout 270 $B --preset qwen3_vl_4b --runs $RUNS --out "$OUT/r5_loop_q3_4b.json" 2>&1 | show ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac; done

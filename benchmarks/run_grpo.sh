#!/usr/bin/env bash
# GRPO benchmark on the device machine (benchmarks/bench_grpo.py): vltrain's loops.grpo.train against TRL's
# GRPOTrainer without vLLM, Qwen2.5-VL-3B architecture (random init), one GPU, the same prompts, both tools in ONE
# process; JSON and log go to $OUT.
#   bash benchmarks/run_grpo.sh      # 8 prompts x 8 completions x 256 tokens, 448px images, 1 warm-up + 2 timed steps
#   PROMPTS=8 GENERATIONS=8 TOKENS=256 STEPS=2 BUDGET=520 PRESET=qwen2_5_vl_3b bash benchmarks/run_grpo.sh  (defaults)
#   SKIP_INSTALL=1 PRESET=tiny_qwen2_5_vl PROMPTS=2 GENERATIONS=4 TOKENS=8 STEPS=1 bash benchmarks/run_grpo.sh
#       (a CPU check of the script)
# Carried wheels: .whl/ (transformers 5.24, liger-kernel 0.8.5, qwen-vl-utils, av) and .whl_trl/ (trl 1.16.0,
# datasets, dill, multiprocess, xxhash: what trl needs that the GPU image lacks). The one benchmark process runs
# under `timeout` BUDGET seconds (the device allows 600 s per command): a run that finished is already in the
# JSON (written after each tool), a hung one is named in the log.
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
PROMPTS=${PROMPTS:-8}; GENERATIONS=${GENERATIONS:-8}; TOKENS=${TOKENS:-256}; STEPS=${STEPS:-2}
BUDGET=${BUDGET:-520}; PRESET=${PRESET:-qwen2_5_vl_3b}; RUNS=${RUNS:-trl,vltrain}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD"
[ -n "${SKIP_INSTALL:-}" ] || python -m pip install --no-deps -q .whl/*.whl .whl_trl/*.whl 2>&1 | grep -v WARNING | tail -2
python -c "import torch, transformers, trl, peft, accelerate, datasets; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__,
'datasets', datasets.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 \
    | tail -1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/env.txt" 2>&1

LEFT=$(( BUDGET - SECONDS ))
timeout -k 10 "$LEFT" python benchmarks/bench_grpo.py --preset "$PRESET" --runs "$RUNS" --prompts "$PROMPTS" \
    --generations "$GENERATIONS" --completion_tokens "$TOKENS" --steps "$STEPS" --warmup 1 \
    --out "$OUT/grpo.json" > "$OUT/grpo.log" 2>&1
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "bench_grpo timed out after ${LEFT}s" >> "$OUT/grpo.log"; fi
grep -E "^card|tok/s|vltrain / TRL|rror|OOM|timed out" "$OUT/grpo.log" | grep -v Warning | tail -8 | tee "$OUT/grpo_summary.txt"
exit "$rc"

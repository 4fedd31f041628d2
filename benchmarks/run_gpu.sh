#!/usr/bin/env bash
# The one device call behind benchmarks/RESULTS.md: GPU tests, then the benchmark runs, each stage
# under its own time limit. Writes logs and JSON to $OUT (default ./bench_out).
#   bash benchmarks/run_gpu.sh
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/env.txt" 2>&1
timeout 150 python -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -25 > "$OUT/pytest_gpu.log"; tail -3 "$OUT/pytest_gpu.log"
B="python benchmarks/bench_sft.py"
F='\[transformers\]|Warning|warn'
timeout 150 $B --preset qwen2_5_vl_3b --runs vltrain:full:gc1,hf:full:gc1 --hf_micro_batch 4 --token_budget 16384 --steps 2 --out "$OUT/q25_3b_gc1.json" 2>&1 | grep -Ev "$F" | tail -4
timeout 120 $B --preset qwen2_5_vl_3b --runs vltrain:full:gc0,hf:full:gc0 --hf_micro_batch 2 --token_budget 8192 --steps 2 --out "$OUT/q25_3b_gc0.json" 2>&1 | grep -Ev "$F" | tail -4
timeout 150 $B --preset qwen2_5_vl_7b --runs vltrain:lora:gc1,hf:lora:gc1 --hf_micro_batch 4 --token_budget 16384 --steps 2 --out "$OUT/q25_7b_lora.json" 2>&1 | grep -Ev "$F" | tail -4
timeout 100 $B --preset qwen2_5_vl_3b --long_tokens 32000 --num_samples 1 --runs vltrain:full:gc1,hf:full:gc1 --steps 1 --out "$OUT/q25_3b_32k.json" 2>&1 | grep -Ev "$F" | tail -4
timeout 100 $B --preset qwen3_vl_4b --runs vltrain:full:gc1,hf:full:gc1 --hf_micro_batch 4 --token_budget 16384 --steps 2 --out "$OUT/q3vl_4b_gc1.json" 2>&1 | grep -Ev "$F" | tail -4

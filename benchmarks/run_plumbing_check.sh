#!/usr/bin/env bash
# The plumbing round's one device call (RESULTS.md "Plumbing check"): after the shared build path / loop
# plumbing / data layer / kernel-review changes, the GPU tests, and the Qwen2.5-VL-3B full-FT cell (GC on)
# HF-default vs vltrain side by side, to see that the SFT numbers still hold.
#   bash benchmarks/run_plumbing_check.sh        (wheels carried in .whl/: transformers 5.24, liger 0.8.5, ...)
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH="$PWD"  # recipes import loops/, vltrain/
python -m pip install --no-deps -q .whl/*.whl 2>&1 | grep -v WARNING | tail -2
if [ -z "${1:-}" ]; then
python -c "import torch, transformers, liger_kernel; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/env.txt" 2>&1
timeout 300 python -m pytest -q -m gpu tests/ -p no:cacheprovider -rs 2>&1 | tail -30 > "$OUT/pytest_gpu.log"; tail -12 "$OUT/pytest_gpu.log"
timeout 240 python benchmarks/bench_sft.py --steps 2 --preset qwen2_5_vl_3b --out "$OUT/plumbing_3b.json" \
    --runs hf:full:gc1@4,vltrain:full:gc1@32768 2>&1 | grep -Ev '\[transformers\]|Warning|warn' | grep -E "card|tok/s|MFU|OOM|rror|^ +[0-9]+ " | tail -12
fi
# Stage 2 (`bash benchmarks/run_plumbing_check.sh backends`): the refactored recipe under each accelerate config
# on one GPU (train, checkpoint, resume, export reloaded; deepspeed built from its sdist without ops), and the
# FSDP2 reference-model test.
if [ "${1:-}" = "backends" ]; then
    DS_BUILD_OPS=0 python -m pip install --no-deps --no-build-isolation -q .whl_ds/* 2>&1 | grep -v WARNING | tail -2
    CONFIGS="single_gpu fsdp2 zero2 zero3" OUT="$OUT/backends" bash benchmarks/run_backends_1gpu.sh 2>&1 | tail -20
    timeout 200 python -m pytest -q -m gpu tests/test_build.py -p no:cacheprovider 2>&1 | grep -E "Error|error|passed|failed" | tail -15
fi

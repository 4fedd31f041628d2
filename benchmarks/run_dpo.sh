#!/usr/bin/env bash
# DPO benchmark on the device machine (benchmarks/bench_dpo.py): vltrain against TRL's DPOTrainer on the
# Qwen2.5-VL-3B architecture (random init), full and LoRA, one GPU, the same pairs; JSON and logs go to $OUT.
#   bash benchmarks/run_dpo.sh           # trl:full + vltrain:full in one process, then the LoRA pair (about 5 min)
#   bash benchmarks/run_dpo.sh full      # the full-FT pair only;  `lora`: the LoRA pair only
#   PAIRS=16 STEPS=3 BUDGET=540 PRESET=qwen2_5_vl_3b bash benchmarks/run_dpo.sh    (the defaults)
#   SKIP_INSTALL=1 PRESET=tiny_qwen2_5_vl PAIRS=4 STEPS=1 bash benchmarks/run_dpo.sh full   (a CPU check of the script)
# Carried wheels: .whl/ (transformers 5.24, liger-kernel 0.8.5, qwen-vl-utils, av) and .whl_trl/ (trl 1.16.0,
# datasets, dill, multiprocess, xxhash: what trl needs that the GPU image lacks).
# Every run is its own process under `timeout`, capped by what is left of BUDGET seconds (the device allows
# 600 s per command), so one hung run cannot eat the rest; the pairs and the checkpoint are written once
# (--prepare_only) and reused by every run through --workdir.
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
STAGE=${1:-all}; PAIRS=${PAIRS:-16}; STEPS=${STEPS:-3}; BUDGET=${BUDGET:-540}; PRESET=${PRESET:-qwen2_5_vl_3b}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD"
[ -n "${SKIP_INSTALL:-}" ] || python -m pip install --no-deps -q .whl/*.whl .whl_trl/*.whl 2>&1 | grep -v WARNING | tail -2
python -c "import torch, transformers, trl, peft, accelerate, datasets; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__,
'datasets', datasets.__version__, torch.cuda.get_device_name())" 2>&1 | tail -1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/env.txt" 2>&1

WORK=$(mktemp -d /tmp/bench_dpo.XXXXXX)
B="python benchmarks/bench_dpo.py --preset $PRESET --pairs $PAIRS --steps $STEPS --warmup 1 --workdir $WORK"
SUMMARY="$OUT/dpo_summary.txt"; : > "$SUMMARY"
show() { grep -E "card|pairs/s|real tokens|OOM|rror|skipped|timed out" | grep -v Warning | tail -4 | tee -a "$SUMMARY"; }

bench() {  # NAME RUN_SPEC MAX_SECONDS
    local left=$(( BUDGET - SECONDS )); local limit=$(( left < $3 ? left : $3 ))
    if [ "$limit" -lt 40 ]; then echo "$2: skipped, ${left}s of the ${BUDGET}s budget left" | tee -a "$SUMMARY"; return; fi
    timeout -k 10 "$limit" $B --runs "$2" --out "$OUT/dpo_$1.json" > "$OUT/dpo_$1.log" 2>&1
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "$2: timed out after ${limit}s" >> "$OUT/dpo_$1.log"; fi
    show < "$OUT/dpo_$1.log"
}

timeout -k 10 200 $B --prepare_only > "$OUT/dpo_prepare.log" 2>&1 || echo "prepare failed (rc $?)" >> "$OUT/dpo_prepare.log"
show < "$OUT/dpo_prepare.log"
case "$STAGE" in
all)  bench same_full trl:full,vltrain:full 250; bench same_lora trl:lora,vltrain:lora 250 ;;  # each pair in one process
full) bench same_full trl:full,vltrain:full 280 ;;
lora) bench same_lora trl:lora,vltrain:lora 280 ;;
*) echo "unknown stage $STAGE (want all, full or lora)"; exit 2 ;;
esac
# One JSON list of every run that finished (a timed-out run has no JSON; its log says so).
python - "$OUT" <<'EOF'
import glob, json, sys
runs = [r for path in sorted(glob.glob(f"{sys.argv[1]}/dpo_same_*.json")) for r in json.load(open(path))]
json.dump(runs, open(f"{sys.argv[1]}/dpo_3b.json", "w"), indent=1)
by = {(r["tool"], r["mode"]): r for r in runs if r.get("ok")}
for mode in ("full", "lora"):
    t, v = by.get(("trl", mode)), by.get(("vltrain", mode))
    if t and v:
        print(f"{mode}: vltrain / TRL pairs/s {v['pairs_per_s'] / t['pairs_per_s']:.2f}x, peak {v['peak_gib']:.1f} vs "
              f"{t['peak_gib']:.1f} GiB, first loss {v['first_loss']:.4f} / {t['first_loss']:.4f}")
EOF
rm -rf "$WORK"

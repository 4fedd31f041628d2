#!/usr/bin/env bash
# Issue 5, the part one GPU allows: every accelerate config started with one process on one GPU.
# For each backend: train the demo's tiny model 40 steps (checkpoint every 20), resume to 50 steps,
# then load the export in plain transformers and compare its eval loss with the trainer's.
#   OUT=out bash benchmarks/run_backends_1gpu.sh
set -u
OUT=${OUT:-backends_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
DATA="${DATA:-/tmp/vltrain_backends_data}"
python -c "from vltrain.synthetic import write_shapes_dataset; write_shapes_dataset('$DATA')"
COMMON="data.train_path=$DATA/train.json data.eval_path=$DATA/eval.json data.image_folder=$DATA/images \
  train.eval_exact_match=0 train.report_to=none train.save_every=20 train.log_every=10 train.eval_every=0"
for cfg in ${CONFIGS:-single_gpu ddp fsdp2 zero2 zero3 zero3_offload}; do
  run="${RUNS:-/tmp/vltrain_backends}/$cfg"; mkdir -p "$run"
  echo "== $cfg"
  timeout 200 accelerate launch --config_file accelerate_configs/$cfg.yaml --num_processes 1 recipes/sft.py demo \
      $COMMON train.output_dir=$run train.max_steps=40 > "$OUT/$cfg.log" 2>&1 || { echo "FAILED (see $cfg.log)"; tail -5 "$OUT/$cfg.log"; continue; }
  timeout 200 accelerate launch --config_file accelerate_configs/$cfg.yaml --num_processes 1 recipes/sft.py demo \
      $COMMON train.output_dir=$run train.max_steps=50 train.resume=auto > "$OUT/$cfg.resume.log" 2>&1 || { echo "RESUME FAILED"; tail -5 "$OUT/$cfg.resume.log"; continue; }
  grep -h "resumed from" "$OUT/$cfg.resume.log"
  python - "$run" "$DATA" <<'PY'
import json, sys
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from torch.utils.data import DataLoader
from vltrain.data.dataset import PadCollator, SFTDataset
from vltrain.data.media import MediaOptions
from loops.sft import count_label_tokens, sft_loss
run = sys.argv[1]
summary = json.load(open(f"{run}/summary.json"))
model = AutoModelForImageTextToText.from_pretrained(f"{run}/final", dtype=torch.float32).cuda().eval()
processor = AutoProcessor.from_pretrained(f"{run}/final")
data = sys.argv[2]
ds = SFTDataset(f"{data}/eval.json", processor, MediaOptions(image_factor=28), max_seq_length=256, image_folder=f"{data}/images")
total = count = 0.0
with torch.no_grad():
    for batch in DataLoader(ds, batch_size=16, collate_fn=PadCollator(processor.tokenizer.pad_token_id)):
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        n = count_label_tokens(batch)
        total += float(sft_loss(model, batch, 1)); count += float(n)
print(f"steps {summary['steps']}  first loss {summary['losses'][0]:.4f}  final loss {summary['final_loss']:.4f}  "
      f"trainer eval {summary['eval_losses'][-1][1]:.4f}  export eval (fp32, plain transformers) {total / count:.4f}")
PY
done

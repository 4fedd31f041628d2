#!/usr/bin/env bash
# GRPO demo tuning sweep on the device machine's CPUs (not its GPU): noisy-label SFT stages, then GRPO variants.
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES=""
O=$OUT
for n in 600 900; do
  python recipes/sft.py grpo_demo_sft data.train_path=synthetic:shapes_mislabeled train.max_steps=$n train.output_dir=$O/sft$n > $O/sft$n.log 2>&1 &
done
wait
grep -h "held-out" $O/sft600.log $O/sft900.log
g() { name=$1; sft=$2; shift 2; python recipes/grpo.py grpo_demo model.name_or_path=$O/sft$sft/final grpo.init_from_sft=null train.output_dir=$O/$name "$@" > $O/$name.log 2>&1; echo "$name $(grep 'held-out mean reward:' $O/$name.log)"; }
g v1 900 optim.lr=7e-4 grpo.temperature=0.7 train.max_steps=300 &
g v2 900 optim.lr=1e-3 grpo.temperature=1.0 train.max_steps=300 &
g v3 900 optim.lr=1.5e-3 grpo.temperature=1.0 train.max_steps=300 &
g v4 900 optim.lr=1e-3 grpo.temperature=0.7 train.micro_batch_size=16 train.max_steps=300 &
g v5 600 optim.lr=1e-3 grpo.temperature=1.0 train.max_steps=300 &
g v6 900 optim.lr=2e-3 grpo.temperature=1.0 train.max_steps=300 &
wait
rm -rf $O/*/final $O/*/data $O/*/checkpoints $O/*/runs

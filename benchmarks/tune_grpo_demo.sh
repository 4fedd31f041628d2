#!/usr/bin/env bash
# GRPO demo tuning sweep, run on the device machine's CPUs (not its GPU; the demo targets a 2-core CPU box):
# SFT stages on mislabelled shapes (60% / 55% of the train answers give the next name), then GRPO variants in
# parallel, 2 threads each. Prints each variant's held-out mean reward before -> after.
#   bash benchmarks/tune_grpo_demo.sh
# The table in benchmarks/RESULTS.md ran (2026-12-01) when `mislabel` applied to every answer, shapes included, at 60%
# for synthetic:shapes_mislabeled; it now applies to colour answers only (65% for the shipped set), so this script
# gives other numbers today.
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES=""
O=${OUT:-tune_out}; mkdir -p "$O"
python -c "from vltrain.synthetic import write_shapes_dataset as w; w('$O/d55', mislabel=0.55)"
python recipes/sft.py grpo_demo_sft data.train_path=synthetic:shapes_mislabeled train.max_steps=600 train.output_dir=$O/s60 > $O/s60.log 2>&1 &
python recipes/sft.py grpo_demo_sft data.train_path=$O/d55/train.json data.eval_path=$O/d55/eval.json \
    data.image_folder=$O/d55/images train.max_steps=600 train.output_dir=$O/s55 > $O/s55.log 2>&1 &
wait
grep -h "held-out" $O/s60.log $O/s55.log
g() { name=$1; sft=$2; shift 2; python recipes/grpo.py grpo_demo model.name_or_path=$O/$sft/final grpo.init_from_sft=null \
      train.output_dir=$O/$name "$@" > $O/$name.log 2>&1; echo "$name $(grep 'held-out mean reward:' $O/$name.log)"; }
g a s60 optim.lr=1e-3 grpo.temperature=1.0 train.max_steps=400 &
g c s55 optim.lr=1e-3 grpo.temperature=1.0 train.max_steps=400 &
g d s55 optim.lr=7e-4 grpo.temperature=0.7 train.max_steps=400 &
g e s60 optim.lr=1e-3 grpo.temperature=0.85 train.max_steps=400 &
g f s55 optim.lr=1e-3 grpo.temperature=1.0 train.max_steps=300 train.micro_batch_size=12 &
wait
rm -rf $O/*/final $O/*/data $O/*/checkpoints $O/*/runs $O/*/sft $O/*/grpo $O/d55

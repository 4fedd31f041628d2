# Sourced by the run_round*.sh stage scripts: strict variables, the output folder $OUT, the environment of every
# benchmark run, and `show`, the filter for the lines of a run worth seeing (card, speed, OOM, errors, and the
# regex the script sets in SHOW_EXTRA before sourcing this).
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
show() { grep -Ev '\[transformers\]|Warning|warn' | grep -E "card|tok/s|OOM|rror${SHOW_EXTRA:+|$SHOW_EXTRA}"; }

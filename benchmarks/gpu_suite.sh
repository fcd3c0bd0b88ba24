#!/usr/bin/env bash
# The GPU command sequence, in phases that each fit well inside one 10-minute device call.
#
#   bash benchmarks/gpu_suite.sh PHASE [PHASE ...]        (from the repository root, .gpu carried)
#
# Phases (rough H200 wall times, measured numbers go in benchmarks/RESULTS.md):
#   tests          pytest -m gpu -q
#   kernels        benchmarks/kernels.py: all kernels x sloth/eager/compile/liger   (< 4 min)
#   e2e-1b         e2e.py llama-1b bf16, checkpointing on, 4 impls                  (< 5 min incl. model creation)
#   e2e-1b-nogc    the same with gradient checkpointing off
#   e2e-8b         e2e.py llama-8b bf16, checkpointing on, 4 impls (creates the 16 GB model folder once)
#   e2e-8b-qlora   e2e.py llama-8b QLoRA NF4, checkpointing on, 4 impls
#   e2e-8b-nogc    llama-8b bf16, checkpointing off
#   padding-free-1b  padding_free.py llama-1b: long-tailed SFT lengths, padded vs packed, 7 impls (~7 min)
#   padding-free-8b  the same on llama-8b, 12 samples a step (~8 min; the budget may skip the last impl)
#   attention      benchmarks/attention.py: varlen kernel vs SDPA / flex, full and packed rows (< 3 min)
# Extra flags: KERNELS_ARGS="--kernels fused_ce" / E2E_ARGS="--impls hf_peft,sloth --steps 5" /
# PF_ARGS="--impls hf_peft,sloth,unsloth --tokens-per-step 16384" / ATTN_ARGS="--seqs 4096,16384".
# E2E_BUDGET_S (default 420): an e2e or padding-free phase starts no new implementation after that
# many seconds.
# The model folders live in /tmp/sloth_bench_models and survive between calls while the machine
# stays warm.
#
# What comes back in $OUT (at most 8 files): <phase>.log for each phase, and results.tgz
# (benchmarks/results/: every JSON, PNG and per-implementation worker log), rewritten after
# every phase so a call cut short still returns what finished.
#
# Device call, e.g.:  carry [".gpu"], command:
#   bash benchmarks/gpu_suite.sh tests kernels
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-benchmarks/results/out}
PY=${PYTHON:-python3}          # the GPU image's python3; PYTHON=... elsewhere
mkdir -p "$OUT" benchmarks/results
[ -f .gpu/setup.sh ] && source .gpu/setup.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 \
       DO_NOT_TRACK=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true

pack() {
  tar czf "$OUT/results.tgz.tmp" --exclude=results/out -C benchmarks results 2>/dev/null \
    && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}

run_phase() {
  local phase=$1 t0=$SECONDS rc
  # an e2e phase starts no new implementation after E2E_BUDGET_S seconds (default 420)
  local e2e="--time-budget-s ${E2E_BUDGET_S:-420} ${E2E_ARGS:-}"
  echo "=== $phase ($(date -u +%H:%M:%S))"
  case $phase in
    tests)        pytest -m gpu -q -rs ;;   # never `python -m pytest`: it puts the root (kernels/) on sys.path
    kernels)      "$PY" benchmarks/kernels.py ${KERNELS_ARGS:-} ;;
    e2e-1b)       "$PY" benchmarks/e2e.py --model llama-1b $e2e ;;
    e2e-1b-nogc)  "$PY" benchmarks/e2e.py --model llama-1b --grad-ckpt off $e2e ;;
    e2e-8b)       "$PY" benchmarks/e2e.py --model llama-8b $e2e ;;
    e2e-8b-qlora) "$PY" benchmarks/e2e.py --model llama-8b --qlora $e2e ;;
    e2e-8b-nogc)  "$PY" benchmarks/e2e.py --model llama-8b --grad-ckpt off $e2e ;;
    padding-free-1b) "$PY" benchmarks/padding_free.py --model llama-1b --time-budget-s ${E2E_BUDGET_S:-420} ${PF_ARGS:-} ;;
    padding-free-8b) "$PY" benchmarks/padding_free.py --model llama-8b --time-budget-s ${E2E_BUDGET_S:-420} ${PF_ARGS:-} ;;
    attention)    "$PY" benchmarks/attention.py ${ATTN_ARGS:-} ;;
    *) echo "unknown phase $phase (tests kernels e2e-1b e2e-1b-nogc e2e-8b e2e-8b-qlora e2e-8b-nogc" \
            "padding-free-1b padding-free-8b attention)"; return 2 ;;
  esac 2>&1 | tee "$OUT/$phase.log"
  rc=${PIPESTATUS[0]}
  echo "=== $phase: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$phase.log"
  pack
  return "$rc"
}

[ $# -gt 0 ] || { sed -n '2,29p' "$0"; exit 2; }
status=0
for phase in "$@"; do
  run_phase "$phase" || status=1
done
exit $status

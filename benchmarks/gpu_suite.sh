#!/usr/bin/env bash
# The GPU command sequence, in phases that each fit well inside one 10-minute device call.
#
#   bash benchmarks/gpu_suite.sh PHASE [PHASE ...]        (from the repository root, .gpu carried)
#
# Phases (rough H200 wall times, measured numbers go in benchmarks/RESULTS.md). Every training phase
# is one configuration of benchmarks/run.py (`python benchmarks/run.py --list` shows the scenarios):
#   tests            pytest -m gpu -q (over 10 min on an H100: use the two halves below, one call each)
#   tests-kernels    pytest -m gpu tests/kernels (the kernels against their torch references)
#   tests-rest       pytest -m gpu, the rest (models, adapters, DeepSpeed, TRL, MoE, VL, fp16 Trainer runs)
#   kernels          benchmarks/kernels.py: all kernels x sloth/eager/compile/liger            (< 4 min)
#   attention        benchmarks/attention.py: varlen kernel vs SDPA / flex, full and packed rows (< 3 min)
#   e2e-1b           run.py --scenario e2e-1b: Llama-3.2-1B bf16, bs 8 x 2048, checkpointing on, 4 impls
#   e2e-1b-nogc      run.py --scenario e2e-1b-nogc: the same with checkpointing off
#   e2e-8b           run.py --scenario e2e-8b: Llama-3.1-8B bf16, bs 2 x 2048, 4 impls (creates the model once)
#   e2e-8b-qlora     run.py --scenario e2e-8b-qlora: the same, QLoRA NF4
#   e2e-8b-nogc      run.py --scenario e2e-8b-nogc
#   e2e-8b-offload   run.py --scenario e2e-8b-offload: sloth gradient_checkpointing="offload" vs Unsloth, bf16
#   e2e-8b-qlora-offload  the same in QLoRA NF4
#   e2e-8b-host      run.py --scenario e2e-8b-host --host-profile: the host's cost of a step
#   padding-free-1b  run.py --scenario padding-free-1b: long-tailed SFT lengths, padded vs packed, 7 impls (~7 min)
#   padding-free-8b  run.py --scenario padding-free-8b (~8 min; the budget may skip the last impl)
#   ckpt-1b          run.py --scenario ckpt-1b: HF with/without checkpointing vs each sloth checkpointing mode
#   longest-8b       run.py --scenario longest-8b: longest bs-1 sequence within 80 GiB, 4 impls (~10 min)
#   dpo-8b           run.py --scenario dpo-8b: TRL DPOTrainer, Llama-3.1-8B, 2 pairs x 2048, PEFT reference: TRL alone,
#                    + Liger, + SlothCallback (default, offload), Unsloth (its default and fused preference loss)
#   dpo-8b-qlora     the same in QLoRA NF4
#   grpo-1b          run.py --scenario grpo-1b: TRL GRPOTrainer, Llama-3.2-1B, 8 x 512 completion tokens (HF generate)
#   zero3-offload-8b run.py --scenario zero3-offload-8b: HF Trainer under DeepSpeed ZeRO-3 + CPU offload, alone
#                    and with SlothCallback (~4 min on an H100)
#   vl-gemma3-4b     run.py --scenario vl-gemma3-4b: Gemma-3-4B multimodal, bs 2 x (256 image + 1792 text tokens), 4 impls
#   vl-qwen2.5-vl-7b run.py --scenario vl-qwen2.5-vl-7b: Qwen2.5-VL-7B, the same batches (448 px images)
#   moe-qwen3-30b-a3b run.py --scenario moe-qwen3-30b-a3b: Qwen3-30B-A3B bf16, bs 2 x 2048, LoRA on attention and
#                    experts, 4 impls (the 57 GiB model folder replaces the other cached models on a 64 GiB disk)
#   matrix           run.py --families all --modes bf16,qlora: every family x precision, 6 impls (HF+PEFT, Liger,
#                    Unsloth, sloth offload, sloth default, sloth default at HF+PEFT's measured peak); resumable
#                    (cells already in results/matrix.json are skipped), so run it again until it is complete
# Extra flags: KERNELS_ARGS="--kernels fused_ce" / RUN_ARGS="--impls hf_peft,sloth --steps 5" (every run.py
# phase) / ATTN_ARGS="--seqs 4096,16384" / MATRIX_ARGS="--families qwen3-8b,gemma-2-9b".
# RUN_BUDGET_S (default 420; E2E_BUDGET_S is read too): a run.py phase starts no new implementation
# after that many seconds.
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
  # a run.py phase starts no new implementation after RUN_BUDGET_S seconds (default 420)
  local run=("$PY" benchmarks/run.py --time-budget-s "${RUN_BUDGET_S:-${E2E_BUDGET_S:-420}}")
  echo "=== $phase ($(date -u +%H:%M:%S))"
  case $phase in
    tests)        pytest -m gpu -q -rs ;;   # never `python -m pytest`: it puts the root (kernels/) on sys.path
    tests-kernels) pytest -m gpu -rA --tb=short tests/kernels ;;
    tests-rest)   pytest -m gpu -rA --tb=short tests --ignore=tests/kernels ;;
    kernels)      "$PY" benchmarks/kernels.py ${KERNELS_ARGS:-} ;;
    attention)    "$PY" benchmarks/attention.py ${ATTN_ARGS:-} ;;
    e2e-8b-host)  "${run[@]}" --scenario "$phase" --host-profile ${RUN_ARGS:-${E2E_ARGS:-}} ;;
    e2e-1b|e2e-1b-nogc|e2e-8b|e2e-8b-qlora|e2e-8b-nogc|e2e-8b-offload|e2e-8b-qlora-offload|padding-free-1b|\
    padding-free-8b|ckpt-1b|longest-8b|vl-gemma3-4b|vl-qwen2.5-vl-7b|moe-qwen3-30b-a3b|dpo-8b|dpo-8b-qlora|grpo-1b|zero3-offload-8b)
                  "${run[@]}" --scenario "$phase" ${RUN_ARGS:-${E2E_ARGS:-}} ;;
    matrix)       "${run[@]}" --name matrix --families all --modes bf16,qlora ${MATRIX_ARGS:-} ${RUN_ARGS:-} ;;
    *) echo "unknown phase $phase (tests tests-kernels tests-rest kernels attention e2e-1b e2e-1b-nogc e2e-8b e2e-8b-qlora e2e-8b-nogc" \
            "e2e-8b-offload e2e-8b-qlora-offload e2e-8b-host padding-free-1b padding-free-8b ckpt-1b longest-8b" \
            "vl-gemma3-4b vl-qwen2.5-vl-7b moe-qwen3-30b-a3b dpo-8b dpo-8b-qlora grpo-1b zero3-offload-8b matrix)"; return 2 ;;
  esac 2>&1 | tee "$OUT/$phase.log"
  rc=${PIPESTATUS[0]}
  echo "=== $phase: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$phase.log"
  pack
  return "$rc"
}

[ $# -gt 0 ] || { sed -n '2,40p' "$0"; exit 2; }
status=0
for phase in "$@"; do
  run_phase "$phase" || status=1
done
exit $status

#!/usr/bin/env bash
# Independent single-GPU jobs side by side on a machine with several GPUs, one lane per GPU.
#
#   bash benchmarks/gpu_lanes.sh 'COMMANDS FOR GPU 0' 'COMMANDS FOR GPU 1' ...
#
# Lane i runs its commands with CUDA_VISIBLE_DEVICES=i and OUT=/tmp/lanes/lane<i> (so
# `bash benchmarks/gpu_suite.sh PHASE` inside a lane writes its logs and results.tgz there).
# Everything under /tmp/lanes is packed into $OUT/lanes.tgz every 20 s and at the end, so a
# call cut short still returns what finished. LANE_LIMIT_S (default 540) stops every lane.
# Timings taken this way share the host (CPU cores, memory bandwidth, PCIe root) with the
# other lane: RESULTS.md says so where it quotes them.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-benchmarks/results/out}
mkdir -p "$OUT" /tmp/lanes
pack() { tar czf "$OUT/lanes.tgz.tmp" -C /tmp lanes 2>/dev/null && mv "$OUT/lanes.tgz.tmp" "$OUT/lanes.tgz"; }

pids=()
for i in $(seq 0 $(($# - 1))); do
  lane=/tmp/lanes/lane$i
  mkdir -p "$lane"
  cmd=${@:$((i + 1)):1}
  ( export CUDA_VISIBLE_DEVICES=$i OUT=$lane
    timeout -k 10 "${LANE_LIMIT_S:-540}" bash -c "$cmd" >"$lane/lane.log" 2>&1
    echo "=== lane $i exit $?" >>"$lane/lane.log" ) &
  pids+=($!)
done
( while sleep 20; do pack; done ) &
packer=$!
for pid in "${pids[@]}"; do wait "$pid"; done
kill "$packer" 2>/dev/null
pack
tail -n 25 /tmp/lanes/lane*/lane.log
